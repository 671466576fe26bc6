//! The `musubi` command's Kubernetes parts as a library (so the Kubernetes tests call the same
//! code): `check` and `inject`.

pub mod check;
pub mod inject;
