//! Opaque API tokens: `ais_` followed by 43 random base62
//! characters (~256 bits). Only [`hash`] of a token is ever stored; since
//! the tokens are high-entropy a plain SHA-256 is enough (no salt or slow
//! KDF needed), the same scheme GitHub uses for its tokens.

use rand::Rng;
use sha2::{Digest, Sha256};

/// Prefix of every opaque API token; tells them apart from JWTs.
pub const PREFIX: &str = "ais_";

/// Number of random base62 characters after [`PREFIX`]
/// (43 × log2(62) ≈ 256 bits, as much entropy as 32 random bytes).
pub const SECRET_LEN: usize = 43;

/// A fresh plaintext token, e.g. `ais_3fZk...` (47 characters).
pub fn generate() -> String {
    let mut out = String::with_capacity(PREFIX.len() + SECRET_LEN);
    out.push_str(PREFIX);
    out.extend(
        rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(SECRET_LEN)
            .map(char::from),
    );
    out
}

/// SHA-256 of the plaintext, lower-case hex (64 characters).
pub fn hash(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

/// Whether `s` has the shape of an opaque API token (as opposed to a JWT).
pub fn looks_like_api_token(s: &str) -> bool {
    s.strip_prefix(PREFIX)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// A short public token id, `tok_` + 12 hex characters.
pub(crate) fn generate_id() -> String {
    format!("tok_{}", hex::encode(rand::random::<[u8; 6]>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_have_the_expected_shape() {
        let t = generate();
        assert_eq!(t.len(), PREFIX.len() + SECRET_LEN);
        assert!(t.starts_with(PREFIX));
        assert!(t[PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(looks_like_api_token(&t));
        assert_ne!(t, generate(), "two tokens must differ");
    }

    #[test]
    fn hash_is_sha256_hex() {
        // Known SHA-256 of "abc".
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(hash("ais_a"), hash("ais_b"));
    }

    #[test]
    fn jwts_are_not_api_tokens() {
        assert!(!looks_like_api_token(
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl"
        ));
        assert!(!looks_like_api_token(""));
        assert!(!looks_like_api_token("ais_"));
        assert!(!looks_like_api_token("ais_abc.def"));
    }

    #[test]
    fn token_ids_are_short_and_public() {
        let id = generate_id();
        assert_eq!(id.len(), 4 + 12);
        assert!(id.starts_with("tok_"));
        assert!(id[4..].bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
