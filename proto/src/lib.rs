//! Musubi's wire APIs: the protobuf messages and tonic services that the identity service,
//! the controller and the proxies speak. It holds generated code and nothing else that does I/O.

/// `musubi.identity.v1`: certificate issuance.
pub mod identity {
    pub mod v1 {
        tonic::include_proto!("musubi.identity.v1");
    }
}
