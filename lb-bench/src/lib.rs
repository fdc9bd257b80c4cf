//! lb-bench's library: the benchmark results format ([`schema`]), the Markdown report and its
//! completeness check ([`report`]), the plots ([`plot`]) and what is recorded about the
//! machine and the code of a run ([`sysinfo`]). The `lb-bench` binary measures the parts and
//! uses these to write `results.json`, `report.md` and the plots.
pub mod plot;
pub mod report;
pub mod schema;
pub mod sysinfo;

pub use schema::Results;
