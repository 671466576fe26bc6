//! The two mesh files a user writes: the controller's (`musubi-controller --mesh-file`) and
//! `musubi up -f`'s, fed the same text. A mesh file the controller accepts must only produce
//! discovery updates and inbound policies that the proxy accepts too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use musubi_controller::file;
use musubi_controller::model::{self, MeshState};
use musubi_fuzz::up_spec;
use musubi_identity::{SpiffeId, TrustDomain};
use musubi_proto::discovery::v1 as dpb;
use musubi_proxy::destination::from_update;
use musubi_proxy::policy::InboundPolicy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match file::parse("mesh.yaml", text) {
        Ok(state) => served_state_is_accepted(&state),
        Err(e) => assert!(e.to_string().starts_with("mesh.yaml: "), "{e}"),
    }
    let _ = up_spec::parse(text);
});

fn served_state_is_accepted(state: &MeshState) {
    let td = TrustDomain::new(&state.trust_domain)
        .unwrap_or_else(|e| panic!("accepted trust domain does not parse: {e}"));
    let mut identities: Vec<SpiffeId> = Vec::new();
    for s in &state.services {
        let update = dpb::ServiceUpdate {
            unknown: false,
            service: Some(s.proto.clone()),
            version: 1,
        };
        match from_update(&update) {
            // Every route rule the controller accepted compiles in the proxy too.
            Ok(Some(d)) => assert!(
                d.routes.errors.is_empty(),
                "the proxy leaves out rules the controller accepted: {:?}",
                d.routes.errors
            ),
            other => panic!(
                "the proxy refuses service {}/{}: {other:?}",
                s.namespace, s.name
            ),
        }
        let target = format!("{}.{}:{}", s.name, s.namespace, s.port);
        if let Err(e) = from_update(&model::resolve(state, &target, &s.namespace)) {
            panic!("the proxy refuses the answer for {target}: {e}");
        }
        for e in &s.proto.endpoints {
            if !e.identity.is_empty() {
                let id = SpiffeId::parse(&e.identity)
                    .unwrap_or_else(|err| panic!("endpoint identity {:?}: {err}", e.identity));
                identities.push(id);
            }
        }
    }
    for (namespace, account) in state.workloads.keys().take(16) {
        let id = SpiffeId::workload(&td, namespace, account)
            .unwrap_or_else(|e| panic!("accepted workload {namespace}/{account}: {e}"));
        identities.push(id);
    }
    for id in identities.iter().take(32) {
        let policy = model::policy_for(state, id);
        if let Err(e) = InboundPolicy::try_from(&policy) {
            panic!("the proxy refuses the inbound policy for {id}: {e}");
        }
    }
}
