//! Client authentication: bearer tokens from the `Authorization`
//! header or `?token=` (browsers cannot set WebSocket headers). Opaque API
//! tokens (stored hashed) and, when configured, JWTs: HS256 with a shared
//! secret, or RS256/ES256 with a PEM public key or a JWKS file.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aishell_store::Store;
use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// Who a connection acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub is_admin: bool,
    /// When the credential stops being valid (connections are closed then
    /// unless the client sends `update_token`).
    pub expires_at: Option<SystemTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <token>` or `?token=`")]
    Missing,
    #[error("token is invalid, revoked or expired")]
    Invalid,
    #[error("token rejected: {0}")]
    Jwt(String),
    #[error("token store unavailable: {0}")]
    Store(#[from] aishell_store::StoreError),
    #[error(
        "this gateway runs agents unconfined (bubblewrap is not installed), so only user `{0}` may connect; install bubblewrap to serve other users"
    )]
    SingleUser(String),
}

/// JWT settings; any of the three key sources may be given.
#[derive(Debug, Clone, Default)]
pub struct JwtConfig {
    pub hs256_secret: Option<String>,
    /// PEM public key (RSA or EC), for RS256 / ES256.
    pub public_key_pem: Option<PathBuf>,
    /// A JWKS file (`{"keys": [...]}`) from the team's identity provider.
    pub jwks_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Claim naming the user [default: sub].
    pub user_claim: String,
    /// Claim granting the admin role: `true`, `"admin"`, or a list containing `"admin"`.
    pub admin_claim: Option<String>,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

pub struct Authenticator {
    keys: Vec<Key>,
    cfg: JwtConfig,
    /// Set when agents run unconfined: nobody else may connect.
    only_user: Option<String>,
}

impl Authenticator {
    /// Opaque tokens only.
    pub fn opaque_only() -> Self {
        Authenticator {
            keys: Vec::new(),
            cfg: JwtConfig::default(),
            only_user: None,
        }
    }

    pub fn new(cfg: Option<JwtConfig>) -> Result<Self, String> {
        let Some(cfg) = cfg else {
            return Ok(Self::opaque_only());
        };
        let mut keys = Vec::new();
        if let Some(secret) = &cfg.hs256_secret {
            let key = DecodingKey::from_secret(secret.as_bytes())
                .map_err(|e| format!("unusable JWT secret: {e}"))?;
            keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key,
            });
        }
        if let Some(path) = &cfg.public_key_pem {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read JWT public key {}: {e}", path.display()))?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                keys.push(Key {
                    kid: None,
                    alg: Algorithm::RS256,
                    key,
                });
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                keys.push(Key {
                    kid: None,
                    alg: Algorithm::ES256,
                    key,
                });
            } else {
                return Err(format!(
                    "{} is neither an RSA nor an EC public key in PEM",
                    path.display()
                ));
            }
        }
        if let Some(path) = &cfg.jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read JWKS {}: {e}", path.display()))?;
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text)
                .map_err(|e| format!("invalid JWKS {}: {e}", path.display()))?;
            for jwk in &set.keys {
                let key =
                    DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key in JWKS: {e}"))?;
                let alg = match jwk.common.key_algorithm.map(|a| a.to_string()) {
                    Some(a) => a
                        .parse()
                        .map_err(|_| format!("unsupported JWKS algorithm {a}"))?,
                    None => match &jwk.algorithm {
                        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                            Algorithm::ES256
                        }
                        _ => Algorithm::RS256,
                    },
                };
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                });
            }
        }
        if keys.is_empty() {
            return Err(
                "JWT is configured but no key was given (secret, public key or JWKS)".into(),
            );
        }
        Ok(Authenticator {
            keys,
            cfg,
            only_user: None,
        })
    }

    /// Accept only `user` (a gateway whose agents run unconfined).
    pub fn restrict_to(&mut self, user: Option<String>) {
        self.only_user = user;
    }

    pub async fn authenticate(
        &self,
        store: &dyn Store,
        token: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let identity = self.identify(store, token).await?;
        match &self.only_user {
            Some(only) if *only != identity.user_id => Err(AuthError::SingleUser(only.clone())),
            _ => Ok(identity),
        }
    }

    async fn identify(
        &self,
        store: &dyn Store,
        token: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        if aishell_store::token::looks_like_api_token(token) || self.keys.is_empty() {
            let record = store.verify_token(token).await?.ok_or(AuthError::Invalid)?;
            let expires_at = record
                .expires_at
                .map(|t| UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64));
            return Ok(Identity {
                user_id: record.user_id,
                is_admin: record.is_admin,
                expires_at,
            });
        }
        self.verify_jwt(token)
    }

    fn verify_jwt(&self, token: &str) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Jwt(e.to_string()))?;
        let candidates = self.keys.iter().filter(|k| {
            k.alg == header.alg && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        });
        let mut last = String::from("no key for this algorithm");
        for key in candidates {
            let mut validation = Validation::new(key.alg);
            validation.leeway = 5;
            match &self.cfg.issuer {
                Some(iss) => validation.set_issuer(&[iss]),
                None => validation.iss = None,
            }
            match &self.cfg.audience {
                Some(aud) => validation.set_audience(&[aud]),
                None => validation.validate_aud = false,
            }
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => return self.identity(&data.claims),
                Err(e) => last = e.to_string(),
            }
        }
        Err(AuthError::Jwt(last))
    }

    fn identity(&self, claims: &serde_json::Map<String, Value>) -> Result<Identity, AuthError> {
        let claim = if self.cfg.user_claim.is_empty() {
            "sub"
        } else {
            &self.cfg.user_claim
        };
        let user_id = claims
            .get(claim)
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::Jwt(format!("claim `{claim}` naming the user is missing")))?;
        validate_user_id(user_id).map_err(AuthError::Jwt)?;
        let is_admin = self
            .cfg
            .admin_claim
            .as_ref()
            .and_then(|c| claims.get(c))
            .is_some_and(|v| match v {
                Value::Bool(b) => *b,
                Value::String(s) => s == "admin",
                Value::Array(a) => a.iter().any(|x| x == "admin"),
                _ => false,
            });
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|s| UNIX_EPOCH + Duration::from_secs(s));
        Ok(Identity {
            user_id: user_id.to_string(),
            is_admin,
            expires_at,
        })
    }
}

/// The bearer token of a request, header first, then the query.
pub fn bearer_token(headers: &HeaderMap, query_token: Option<&str>) -> Option<String> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    header
        .or_else(|| query_token.map(str::to_string))
        .filter(|t| !t.is_empty())
}

/// User ids name directories: no `/`, `..`, NUL or control characters.
pub fn validate_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("user id must be 1 to 64 characters".into());
    }
    if id == "." || id == ".." || id.starts_with('.') {
        return Err("user id must not start with a dot".into());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')))
    {
        return Err(format!(
            "user id contains a forbidden character {c:?} (allowed: letters, digits, - _ . @)"
        ));
    }
    Ok(())
}

/// Conversation ids travel into agents and file names: keep them plain.
pub fn validate_conversation_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    #[test]
    fn user_ids_that_could_escape_are_rejected() {
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "../x",
            "a\0b",
            "a\nb",
            ".hidden",
            "ä",
            &"x".repeat(65),
        ] {
            assert!(validate_user_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["alice", "bob-2", "carol_x", "d.e", "u@example.com"] {
            assert!(validate_user_id(good).is_ok(), "{good:?} rejected");
        }
    }

    fn hs(claims: Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn authn() -> Authenticator {
        Authenticator::new(Some(JwtConfig {
            hs256_secret: Some("s3cret".into()),
            issuer: Some("https://idp.example".into()),
            audience: Some("aishell".into()),
            user_claim: "sub".into(),
            admin_claim: Some("roles".into()),
            ..Default::default()
        }))
        .unwrap()
    }

    #[test]
    fn hs256_jwts_are_checked_for_signature_expiry_issuer_audience_and_user() {
        let a = authn();
        let good = serde_json::json!({"sub": "alice", "exp": now() + 60, "iss": "https://idp.example", "aud": "aishell", "roles": ["admin"]});
        let id = a.verify_jwt(&hs(good.clone(), "s3cret")).unwrap();
        assert_eq!((id.user_id.as_str(), id.is_admin), ("alice", true));
        assert!(id.expires_at.is_some());
        assert!(
            a.verify_jwt(&hs(good.clone(), "wrong")).is_err(),
            "bad signature"
        );
        let mut expired = good.clone();
        expired["exp"] = (now() - 3600).into();
        assert!(a.verify_jwt(&hs(expired, "s3cret")).is_err(), "expired");
        let mut other_iss = good.clone();
        other_iss["iss"] = "https://evil.example".into();
        assert!(a.verify_jwt(&hs(other_iss, "s3cret")).is_err(), "issuer");
        let mut other_aud = good.clone();
        other_aud["aud"] = "something-else".into();
        assert!(a.verify_jwt(&hs(other_aud, "s3cret")).is_err(), "audience");
        let mut escape = good.clone();
        escape["sub"] = "../root".into();
        assert!(
            a.verify_jwt(&hs(escape, "s3cret")).is_err(),
            "user id validated"
        );
        let mut plain = good;
        plain["roles"] = serde_json::json!(["user"]);
        assert!(!a.verify_jwt(&hs(plain, "s3cret")).unwrap().is_admin);
        assert!(a.verify_jwt("not.a.jwt").is_err());
    }

    #[test]
    fn an_algorithm_the_key_was_not_configured_for_is_refused() {
        let a = authn();
        // "none" and other algorithms never verify against an HS256 secret.
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &serde_json::json!({"sub": "alice", "exp": now() + 60}),
            &EncodingKey::from_secret(b"s3cret").unwrap(),
        )
        .unwrap();
        assert!(a.verify_jwt(&token).is_err());
        let unsigned = format!("{}.{}.", "eyJhbGciOiJub25lIn0", "eyJzdWIiOiJhbGljZSJ9");
        assert!(a.verify_jwt(&unsigned).is_err());
    }

    /// Generate a key pair with the openssl CLI: (private PEM, public PEM).
    fn keypair(dir: &std::path::Path, kind: &str) -> (Vec<u8>, std::path::PathBuf) {
        let key = dir.join(format!("{kind}.key"));
        let public = dir.join(format!("{kind}.pub"));
        let run = |args: &[&str]| {
            let st = std::process::Command::new("openssl")
                .args(args)
                .status()
                .expect("openssl");
            assert!(st.success(), "openssl {args:?}");
        };
        let (k, p) = (key.to_str().unwrap(), public.to_str().unwrap());
        if kind == "rsa" {
            run(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                k,
            ]);
            run(&["pkey", "-in", k, "-pubout", "-out", p]);
        } else {
            run(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                k,
            ]);
            run(&["pkey", "-in", k, "-pubout", "-out", p]);
        }
        (std::fs::read(&key).unwrap(), public)
    }

    #[test]
    fn rs256_and_es256_pem_keys_and_a_jwks_file_verify_their_own_tokens_only() {
        let dir = tempfile::tempdir().unwrap();
        let claims = serde_json::json!({"sub": "carol", "exp": now() + 60});
        for (kind, alg) in [("rsa", Algorithm::RS256), ("ec", Algorithm::ES256)] {
            let (private, public) = keypair(dir.path(), kind);
            let enc = if kind == "rsa" {
                EncodingKey::from_rsa_pem(&private)
            } else {
                EncodingKey::from_ec_pem(&private)
            }
            .unwrap();
            let token = jsonwebtoken::encode(&Header::new(alg), &claims, &enc).unwrap();
            let pem = Authenticator::new(Some(JwtConfig {
                public_key_pem: Some(public),
                user_claim: "sub".into(),
                ..Default::default()
            }))
            .unwrap();
            assert_eq!(
                pem.verify_jwt(&token).unwrap().user_id,
                "carol",
                "{kind} PEM"
            );
            // The same key published as a JWKS with a key id.
            let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, alg).unwrap();
            jwk.common.key_id = Some(format!("{kind}-1"));
            let jwks_path = dir.path().join(format!("{kind}.jwks"));
            std::fs::write(&jwks_path, serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
            let jwks = Authenticator::new(Some(JwtConfig {
                jwks_file: Some(jwks_path),
                user_claim: "sub".into(),
                ..Default::default()
            }))
            .unwrap();
            let mut header = Header::new(alg);
            header.kid = Some(format!("{kind}-1"));
            let with_kid = jsonwebtoken::encode(&header, &claims, &enc).unwrap();
            assert_eq!(
                jwks.verify_jwt(&with_kid).unwrap().user_id,
                "carol",
                "{kind} JWKS"
            );
            // A token from another key of the same kind is refused by both.
            let (other_private, _) = keypair(dir.path(), kind);
            let other = if kind == "rsa" {
                EncodingKey::from_rsa_pem(&other_private)
            } else {
                EncodingKey::from_ec_pem(&other_private)
            }
            .unwrap();
            let forged = jsonwebtoken::encode(&header, &claims, &other).unwrap();
            assert!(
                pem.verify_jwt(&forged).is_err() && jwks.verify_jwt(&forged).is_err(),
                "{kind}: foreign key accepted"
            );
        }
    }
}
