//! Processes a lab owns, by label: killed (in reverse start order) before its namespaces go.
use super::netns::Proc;

/// An ordered set of labelled processes.
#[derive(Debug, Default)]
pub struct Procs(Vec<(String, Proc)>);

impl Procs {
    /// Adds `proc` under `label`; a process already under `label` is killed and replaced.
    pub fn adopt(&mut self, label: impl Into<String>, proc: Proc) {
        let label = label.into();
        drop(self.take(&label));
        self.0.push((label, proc));
    }

    /// The process under `label`.
    pub fn get_mut(&mut self, label: &str) -> Option<&mut Proc> {
        self.0.iter_mut().find(|(l, _)| l == label).map(|(_, p)| p)
    }

    /// Takes the process under `label` back.
    pub fn take(&mut self, label: &str) -> Option<Proc> {
        let idx = self.0.iter().position(|(l, _)| l == label)?;
        Some(self.0.remove(idx).1)
    }

    /// Kills every process, the last started first.
    pub fn kill_all(&mut self) {
        while let Some((_, mut proc)) = self.0.pop() {
            proc.kill();
        }
    }
}
