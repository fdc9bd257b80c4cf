//! The load balancer's test kit: network-namespace labs (one node, or several on one L2
//! segment via [`lab::Topology`]), real clients, the packet builder, the `BPF_PROG_RUN`
//! harness, the agent runner, guards for bpffs pins and lab cgroups, and the `lb-podserver`
//! (backend) and `lb-loadgen` (load generator) binaries run inside pod namespaces.
pub mod agent;
pub mod bpffs;
pub mod cgroup;
pub mod cli;
pub mod harness;
pub mod lab;
pub mod packet;
