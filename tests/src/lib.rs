//! Test support for the load balancer: network-namespace labs, real clients, and the
//! `lb-podserver` binary used as a backend inside pod namespaces.
pub mod agent;
pub mod bpffs;
pub mod harness;
pub mod lab;
pub mod packet;
