//! Where the Kubernetes objects fed to [`crate::model::compute`] come from: the API server
//! (`kube`: watches) or a directory of YAML manifests (`manifests`).
pub mod kube;
pub mod manifests;
