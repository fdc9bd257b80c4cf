//! Test support shared by the integration tests.
pub mod fake_apiserver;
pub mod objects;
pub mod random;
