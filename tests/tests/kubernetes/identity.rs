//! The identity service with real service-account tokens: TokenReview against the API server,
//! and the offline JWKS mode fed by the API server's `/openid/v1/jwks`.

use crate::support;
use musubi_identity::cert;
use musubi_identity::client;
use musubi_identity::csr::build_csr;
use musubi_identity::token::jwks::JwksValidator;
use musubi_identity::token::kubernetes::TokenReviewValidator;
use musubi_identity::token::{AUDIENCE, TokenValidator};
use musubi_proto::identity::v1::CertifyRequest;
use musubi_proto::identity::v1::identity_client::IdentityClient;
use musubi_tests::Identity;
use musubi_tests::apiserver::SA_ISSUER;
use std::sync::Arc;
use tonic::Code;

async fn certify(
    identity: &Identity,
    csr: Vec<u8>,
    token: String,
) -> Result<musubi_proto::identity::v1::CertifyResponse, tonic::Status> {
    let channel = client::connect(
        &identity.addr(),
        &identity.ca.bundle,
        identity.service.id.clone(),
    )
    .unwrap();
    IdentityClient::new(channel)
        .certify(CertifyRequest { csr, token })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn tokenreview_issues_for_a_real_token_and_refuses_another_accounts_csr() {
    let api = musubi_tests::api_server_or_skip!();
    let kube = api.client().await;
    let ns = support::namespace(&kube, "ident", &[], &[]).await;
    support::service_account(&kube, &ns, "api").await;
    support::service_account(&kube, &ns, "web").await;
    let validator = TokenReviewValidator::new(kube.clone(), AUDIENCE.to_string());
    let identity = Identity::start_with(|cfg| cfg.validator = Arc::new(validator)).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();

    let api_token = support::token(&kube, &ns, "api", AUDIENCE).await;
    let csr_api = build_csr(&key, &identity.id(&ns, "api")).unwrap();
    let resp = certify(&identity, csr_api.clone(), api_token.clone())
        .await
        .unwrap();
    assert_eq!(
        cert::spiffe_id(&resp.leaf).unwrap().to_string(),
        format!("spiffe://cluster.local/ns/{ns}/sa/api")
    );

    // web's token with api's CSR: the token proves web, the CSR asks for api.
    let web_token = support::token(&kube, &ns, "web", AUDIENCE).await;
    let refused = certify(&identity, csr_api.clone(), web_token)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("but the token proves")
            && refused.message().ends_with("/sa/web"),
        "{}",
        refused.message()
    );

    // A token for another audience (the API server's own) proves nothing here.
    let kube_token = support::token(&kube, &ns, "api", SA_ISSUER).await;
    let refused = certify(&identity, csr_api.clone(), kube_token)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A deleted service account's token stops working: the API server knows (once its
    // service-account cache has seen the deletion), an offline JWKS check would not.
    kube::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(kube.clone(), &ns)
        .delete("api", &Default::default())
        .await
        .unwrap();
    let refused = musubi_tests::eventually(
        "the deleted service account's token to be refused",
        std::time::Duration::from_secs(20),
        || {
            let (csr, token, identity) = (csr_api.clone(), api_token.clone(), &identity);
            async move { certify(identity, csr, token).await.err() }
        },
    )
    .await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
}

#[tokio::test]
async fn offline_jwks_from_the_api_server_validates_its_tokens() {
    let api = musubi_tests::api_server_or_skip!();
    let kube = api.client().await;
    let ns = support::namespace(&kube, "jwks", &[], &[]).await;
    support::service_account(&kube, &ns, "api").await;
    let jwks = kube
        .request_text(
            http::Request::get("/openid/v1/jwks")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let validator = JwksValidator::from_json(SA_ISSUER, jwks.as_bytes()).unwrap();
    let token = support::token(&kube, &ns, "api", AUDIENCE).await;
    let workload = validator.validate(&token).await.unwrap();
    assert_eq!(workload.namespace, ns);
    assert_eq!(workload.service_account, "api");
    let wrong_audience = support::token(&kube, &ns, "api", SA_ISSUER).await;
    let e = validator.validate(&wrong_audience).await.unwrap_err();
    assert_eq!(e.reason(), "token_wrong_audience");
}
