//! lb-agent: loads and pins the datapath, and keeps its maps equal to this node's desired
//! state derived from Kubernetes objects.
pub mod bpfsys;
pub mod controller;
pub mod ct_gc;
pub mod dataplane;
pub mod hash;
pub mod health;
pub mod http;
pub mod loader;
pub mod model;
pub mod peer_ifs;
pub mod pins;
pub mod ports;
pub mod source;
pub mod sync;
