//! Musubi's injector: the mutating admission webhook that adds the proxy to pods of meshed
//! namespaces, and the offline `musubi inject`. It knows pod specs, not proxies: the patch is a
//! pure function of the pod, its namespace's annotations and the mesh configuration.

pub mod annotations;
pub mod config;
pub mod manifest;
pub mod patch;
pub mod review;
pub mod server;

pub use config::InjectConfig;
