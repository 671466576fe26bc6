//! Musubi's wire APIs: the protobuf messages and tonic services that the identity service,
//! the controller and the proxies speak. It holds generated code and nothing else that does I/O.

/// `musubi.identity.v1`: certificate issuance.
pub mod identity {
    pub mod v1 {
        tonic::include_proto!("musubi.identity.v1");
    }
}

/// `musubi.discovery.v1`: what is behind a destination.
pub mod discovery {
    pub mod v1 {
        tonic::include_proto!("musubi.discovery.v1");
    }
}

/// `musubi.policy.v1`: inbound mTLS mode and authorization.
pub mod policy {
    pub mod v1 {
        tonic::include_proto!("musubi.policy.v1");
    }
}
