//! Musubi against a real Kubernetes API server (kube-apiserver + etcd built from their Go
//! modules; one per run of this binary, see `musubi_tests::apiserver`). Each test works in
//! namespaces of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

mod controller;
mod identity;
mod injector;
mod install;
mod routes;
mod support;
