//! Hostile credentials never panic and never verify:
//! runner credentials and JWTs from arbitrary bytes, and tampered real ones.

use std::time::Duration;

use aishell_gateway::auth::{Authenticator, JwtConfig};
use aishell_gateway::credential::CredentialSigner;
use proptest::prelude::*;

type Fixture = (
    tokio::runtime::Runtime,
    std::sync::Arc<dyn aishell_store::Store>,
    Authenticator,
);

/// One runtime, store and authenticator for all cases.
fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt.block_on(aishell_store::open("sqlite::memory:")).unwrap();
        (rt, store, authenticator())
    })
}

fn authenticator() -> Authenticator {
    Authenticator::new(Some(JwtConfig {
        hs256_secret: Some("k".into()),
        user_claim: "sub".into(),
        ..Default::default()
    }))
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn arbitrary_runner_credentials_are_refused(s in ".{0,300}") {
        let signer = CredentialSigner::new(vec![9; 32]);
        prop_assert!(signer.verify(&s).is_err());
    }

    #[test]
    fn tampered_runner_credentials_are_refused(pos in 0usize..200, byte in any::<u8>()) {
        let signer = CredentialSigner::new(vec![9; 32]);
        let good = signer.mint("t-1", aishell_backend::TaskMode::Cold, Some("s-1"), Duration::from_secs(60));
        let mut bytes = good.clone().into_bytes();
        let i = pos % bytes.len();
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        let tampered = String::from_utf8_lossy(&bytes).into_owned();
        prop_assume!(tampered != good);
        // Some edits only touch trailing base64 bits that decode the same;
        // whatever verifies must still name the same task and session.
        if let Ok(claims) = signer.verify(&tampered) {
            prop_assert_eq!(claims.task_id, "t-1");
            prop_assert_eq!(claims.session_id.as_deref(), Some("s-1"));
        }
    }

    #[test]
    fn arbitrary_bearer_strings_never_panic_the_jwt_path(s in "(ais_)?[A-Za-z0-9_.=-]{0,400}") {
        let (rt, store, auth) = fixture();
        let result = rt.block_on(auth.authenticate(store.as_ref(), Some(&s)));
        prop_assert!(result.is_err());
    }
}
