//! The `musubi` command's Kubernetes parts as a library (so the Kubernetes tests call the same
//! code): `check`, `inject` and `install`.

pub mod check;
pub mod inject;
pub mod install;
