//! The injector's two inputs from outside: an AdmissionReview body from the API server (JSON)
//! and the manifests `musubi inject` reads (YAML, of which JSON is a subset), fed the same bytes.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use musubi_injector::{InjectConfig, manifest, review};
use std::collections::BTreeMap;
use std::sync::LazyLock;

static CONFIG: LazyLock<InjectConfig> =
    LazyLock::new(|| InjectConfig::with_anchors("-----BEGIN CERTIFICATE-----\n".into()));

static OPTED_IN: LazyLock<BTreeMap<String, String>> =
    LazyLock::new(|| BTreeMap::from([("musubi.io/inject".to_string(), "enabled".to_string())]));

fuzz_target!(|data: &[u8]| {
    admission_review(data);
    if let Ok(text) = std::str::from_utf8(data) {
        inject_manifests(text);
    }
});

fn admission_review(body: &[u8]) {
    let Ok(request) = review::decode(body) else {
        return;
    };
    for namespace in [Some(&*OPTED_IN), None] {
        let answer = review::answer(&request, namespace, &CONFIG);
        let response = &answer.review["response"];
        assert_eq!(response["uid"].as_str(), Some(request.uid.as_str()));
        let allowed = response["allowed"].as_bool();
        match answer.outcome {
            "injected" => {
                assert_eq!(allowed, Some(true));
                let patch = response["patch"].as_str().unwrap_or_default();
                let patch = base64::engine::general_purpose::STANDARD
                    .decode(patch)
                    .expect("the patch is base64");
                let ops: serde_json::Value =
                    serde_json::from_slice(&patch).expect("the patch is JSON");
                assert!(ops.as_array().is_some_and(|ops| !ops.is_empty()), "{ops}");
            }
            "denied" => assert_eq!(allowed, Some(false)),
            "skipped" | "unreadable" => assert_eq!(allowed, Some(true)),
            other => panic!("unknown outcome {other:?}"),
        }
    }
}

fn inject_manifests(text: &str) {
    let Ok((out, outcomes)) = manifest::inject(text, &CONFIG) else {
        return;
    };
    // What `musubi inject` prints is valid input, and injecting it again changes nothing.
    let (again, second) = manifest::inject(&out, &CONFIG)
        .unwrap_or_else(|e| panic!("injected output does not inject again: {e}\n{out}"));
    assert_eq!(second.len(), outcomes.len(), "{out}");
    assert!(
        second.iter().all(|o| o.result.starts_with("skipped")),
        "{second:?}"
    );
    assert_eq!(again, out, "a second injection changed the output");
}
