//! The benchmark results format: one [`PartResult`] per part (what `lb-bench PART` writes),
//! made of [`Row`]s, each with named [`Metric`]s summarised by [`Stat`]; a whole run is a
//! [`Results`] (`results.json`), the parts plus the run's [`Meta`].
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::sysinfo::Meta;

/// The benchmark parts, in run order.
pub const PARTS: [&str; 4] = ["per-packet", "e2e", "throughput", "control-plane"];

/// The `section` parameter of the per-packet rows that compare conntrack LRU flavours under
/// SYN load; the report gives them a table of their own.
pub const CT_LRU_SECTION: &str = "ct-lru";

/// The e2e case of a client process in a pod connecting to a ClusterIP whose endpoint is
/// another pod of the same node (TCP_CRR): `direct` (to the pod IP), `ours` (socket hooks
/// translate the connect), kube-proxy's nftables and iptables rules (DNAT on the node).
/// The report and the plots give it a section and a figure of its own.
pub const CLUSTERIP_CASE: &str = "TCP_CRR pod -> ClusterIP";

/// Summary of repeated measurements of one quantity. A value that could not be measured is
/// NaN in memory and `null` in JSON (JSON has no NaN).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    #[serde(with = "nan_as_null")]
    pub median: f64,
    #[serde(with = "nan_as_null")]
    pub min: f64,
    #[serde(with = "nan_as_null")]
    pub max: f64,
    /// First and third quartiles.
    #[serde(with = "nan_as_null")]
    pub q1: f64,
    #[serde(with = "nan_as_null")]
    pub q3: f64,
    /// How many measurements (runs) this summarises.
    pub runs: usize,
    /// The measurements themselves, in run order.
    #[serde(with = "nan_as_null_vec")]
    pub samples: Vec<f64>,
}

mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

mod nan_as_null_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| x.is_finite().then_some(*x)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Option<f64>>::deserialize(d)?
            .into_iter()
            .map(|x| x.unwrap_or(f64::NAN))
            .collect())
    }
}

impl Stat {
    /// Summary of `samples` (empty samples give an all-NaN stat with `runs == 0`).
    pub fn of(samples: &[f64]) -> Stat {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return Stat {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                q1: f64::NAN,
                q3: f64::NAN,
                runs: 0,
                samples: samples.to_vec(),
            };
        }
        s.sort_by(f64::total_cmp);
        Stat {
            median: quantile(&s, 0.5),
            min: s[0],
            max: s[s.len() - 1],
            q1: quantile(&s, 0.25),
            q3: quantile(&s, 0.75),
            runs: s.len(),
            samples: samples.to_vec(),
        }
    }

    /// A single measurement.
    pub fn single(x: f64) -> Stat {
        Stat::of(&[x])
    }

    pub fn is_valid(&self) -> bool {
        self.runs > 0 && self.median.is_finite()
    }
}

/// Linear-interpolated quantile of sorted `s` (`q` in 0..=1).
pub fn quantile(s: &[f64], q: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// One named quantity of a row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// e.g. `ns_per_packet`, `p50_us`, `tps`.
    pub name: String,
    /// e.g. `ns`, `µs`, `1/s`.
    pub unit: String,
    pub stat: Stat,
}

/// One measured configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// One of [`PARTS`].
    pub part: String,
    /// What was measured: a frame kind, a request mode, a programming method...
    pub case: String,
    /// Which datapath: `ours`, `direct`, `iptables-end`, `iptables-middle`, `nftables`...
    pub path: String,
    /// Services programmed.
    pub services: u64,
    /// Other parameters (conntrack entries present, repeat count, method...).
    pub params: BTreeMap<String, String>,
    pub metrics: Vec<Metric>,
    /// Set when the measurement failed: the row then has no usable metrics.
    pub error: Option<String>,
    /// How the number was obtained or checked, for the reader.
    pub note: String,
}

impl Row {
    pub fn new(part: &str, case: &str, path: &str, services: u64) -> Row {
        Row {
            part: part.into(),
            case: case.into(),
            path: path.into(),
            services,
            ..Row::default()
        }
    }

    pub fn param(mut self, k: &str, v: impl ToString) -> Row {
        self.params.insert(k.into(), v.to_string());
        self
    }

    pub fn metric(mut self, name: &str, unit: &str, stat: Stat) -> Row {
        self.metrics.push(Metric {
            name: name.into(),
            unit: unit.into(),
            stat,
        });
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    pub fn failed(mut self, error: impl ToString) -> Row {
        self.error = Some(error.to_string());
        self
    }

    pub fn get(&self, name: &str) -> Option<&Stat> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| &m.stat)
    }
}

/// What one part of `lb-bench` produced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartResult {
    pub part: String,
    pub quick: bool,
    pub rows: Vec<Row>,
    /// Facts about the run worth keeping (XDP attach mode, iptables backend, method notes).
    pub facts: BTreeMap<String, String>,
    pub elapsed_s: f64,
}

/// Everything one benchmark run produced: `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub parts: Vec<PartResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_summary() {
        let s = Stat::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(s.median, 3.0);
        assert_eq!((s.min, s.max), (1.0, 5.0));
        assert_eq!((s.q1, s.q3), (2.0, 4.0));
        assert_eq!(s.runs, 5);
        assert_eq!(s.samples, vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        let even = Stat::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(even.median, 2.5);
        let empty = Stat::of(&[]);
        assert!(!empty.is_valid());
        assert!(Stat::single(7.0).is_valid());
    }

    #[test]
    fn row_round_trips_through_json() {
        let r = Row::new("e2e", "TCP_RR", "ours", 1000)
            .param("rounds", 3)
            .metric("p50_us", "µs", Stat::of(&[10.0, 11.0, 12.0]))
            .note("same run");
        let text = serde_json::to_string(&r).expect("serialize");
        let back: Row = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, r);
        assert_eq!(back.get("p50_us").map(|s| s.median), Some(11.0));
    }

    #[test]
    fn nan_survives_json_as_null() {
        let s = Stat::of(&[]);
        let text = serde_json::to_string(&s).expect("serialize");
        assert!(text.contains("\"median\":null"), "{text}");
        let back: Stat = serde_json::from_str(&text).expect("deserialize");
        assert!(back.median.is_nan() && !back.is_valid());
        let one = Stat::of(&[1.0, f64::NAN]);
        let back: Stat =
            serde_json::from_str(&serde_json::to_string(&one).expect("ser")).expect("de");
        assert_eq!(back.median, 1.0);
        assert!(back.samples[1].is_nan());
    }
}
