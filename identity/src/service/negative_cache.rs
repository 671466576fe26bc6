//! Tokens the validator refused as invalid, remembered for a while so that sending the same
//! junk token again costs a hash lookup instead of another TokenReview.
//!
//! Entries are keyed by the token's SHA-256; the token itself is never stored. Only refusals
//! that will not change while the token lives are remembered ([`remembered`]); a refusal
//! because the validator could not be reached never is.
//!
//! Every entry lives for the same TTL. It is not cut short at the token's `exp`: `exp` is read
//! from a token nobody has verified, so an attacker would set it to "now" to make every entry
//! useless, and keeping an entry past `exp` is never wrong, since such a token is refused then
//! anyway.

use super::Refusal;
use crate::token::TokenError;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// SHA-256 of a token.
pub type TokenDigest = [u8; 32];

pub fn digest(token: &str) -> TokenDigest {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Whether a refusal by the validator is remembered: it must stay true for the token.
///
/// `NotYetValid` is the one refusal a token outgrows by itself (and the JWKS validator only
/// reaches it once the signature verified, so junk cannot produce it); `Unavailable` says
/// nothing about the token.
pub fn remembered(e: &TokenError) -> bool {
    match e {
        TokenError::Unavailable(_) | TokenError::NotYetValid => false,
        TokenError::Empty
        | TokenError::TooLarge(_)
        | TokenError::Malformed(_)
        | TokenError::BadSignature(_)
        | TokenError::WrongAudience { .. }
        | TokenError::WrongIssuer { .. }
        | TokenError::Expired
        | TokenError::NoServiceAccount(_)
        | TokenError::Rejected(_) => true,
    }
}

/// A bounded map from token digest to the refusal, oldest first out.
///
/// All entries share one TTL and `now` never goes backwards, so insertion order is expiry
/// order: the oldest entry is always at the front of `order`, and `order` and `entries` hold
/// the same keys.
#[derive(Debug)]
pub struct NegativeCache {
    ttl: Duration,
    capacity: usize,
    entries: HashMap<TokenDigest, (Refusal, Instant)>,
    order: VecDeque<TokenDigest>,
}

impl NegativeCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        NegativeCache {
            ttl,
            capacity,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The remembered refusal of the token with this digest, if it has not expired at `now`.
    pub fn get(&mut self, key: &TokenDigest, now: Instant) -> Option<Refusal> {
        self.expire(now);
        self.entries
            .get(key)
            .filter(|(_, expires)| now < *expires)
            .map(|(refusal, _)| refusal.clone())
    }

    /// Remembers a refusal from `now` for the TTL, dropping the oldest entries to stay within
    /// capacity. A token already remembered keeps its entry.
    pub fn insert(&mut self, key: TokenDigest, refusal: Refusal, now: Instant) {
        self.expire(now);
        if self.capacity == 0 || self.entries.contains_key(&key) {
            return;
        }
        while self.entries.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.entries.insert(key, (refusal, now + self.ttl));
        self.order.push_back(key);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(oldest) = self.order.front() {
            match self.entries.get(oldest) {
                Some((_, expires)) if now < *expires => break,
                _ => {
                    self.entries.remove(oldest);
                    self.order.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(reason: &'static str) -> Refusal {
        Refusal {
            code: tonic::Code::Unauthenticated,
            reason,
            message: format!("refused: {reason}"),
        }
    }

    #[derive(Debug)]
    enum Step {
        /// Remember token `n` at `secs`.
        Insert(u8, u64),
        /// Look token `n` up at `secs`: the reason remembered, if any.
        Get(u8, u64, Option<&'static str>),
        Len(usize),
    }
    use Step::*;

    fn key(n: u8) -> TokenDigest {
        digest(&format!("token-{n}"))
    }

    #[test]
    fn negative_cache_scripts() {
        // TTL 60 s.
        let cases: Vec<(&str, usize, Vec<Step>)> = vec![
            (
                "hit until the TTL, then gone",
                10,
                vec![
                    Get(1, 0, None),
                    Insert(1, 0),
                    Get(1, 0, Some("r1")),
                    Get(1, 59, Some("r1")),
                    Get(2, 59, None),
                    Get(1, 60, None),
                    Len(0),
                ],
            ),
            (
                "expired entries leave on their own as time passes",
                10,
                vec![
                    Insert(1, 0),
                    Insert(2, 30),
                    Len(2),
                    Get(3, 61, None),
                    Len(1),
                    Get(2, 61, Some("r2")),
                    Get(2, 90, None),
                    Len(0),
                ],
            ),
            (
                "size bound: the oldest goes first",
                3,
                vec![
                    Insert(1, 0),
                    Insert(2, 1),
                    Insert(3, 2),
                    Insert(4, 3),
                    Len(3),
                    Get(1, 3, None),
                    Get(2, 3, Some("r2")),
                    Get(4, 3, Some("r4")),
                    Insert(5, 4),
                    Get(2, 4, None),
                    Get(3, 4, Some("r3")),
                    Len(3),
                ],
            ),
            (
                "a token remembered again keeps its first entry and expiry",
                3,
                vec![
                    Insert(1, 0),
                    Insert(1, 30),
                    Len(1),
                    Get(1, 59, Some("r1")),
                    Get(1, 60, None),
                    // Once expired it can be remembered afresh.
                    Insert(1, 60),
                    Get(1, 119, Some("r1")),
                ],
            ),
            (
                "capacity zero remembers nothing",
                0,
                vec![Insert(1, 0), Get(1, 0, None), Len(0)],
            ),
        ];
        let reasons = ["r0", "r1", "r2", "r3", "r4", "r5"];
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        for (name, capacity, steps) in cases {
            let mut cache = NegativeCache::new(Duration::from_secs(60), capacity);
            for (i, step) in steps.iter().enumerate() {
                match *step {
                    Insert(n, secs) => cache.insert(key(n), refusal(reasons[n as usize]), at(secs)),
                    Get(n, secs, want) => {
                        let got = cache.get(&key(n), at(secs));
                        assert_eq!(got.as_ref().map(|r| r.reason), want, "{name}, step {i}");
                        if let Some(r) = got {
                            assert_eq!(r.message, format!("refused: {}", r.reason));
                        }
                    }
                    Len(n) => assert_eq!(cache.len(), n, "{name}, step {i}"),
                }
                assert_eq!(cache.order.len(), cache.entries.len(), "{name}, step {i}");
            }
        }
    }

    #[test]
    fn the_bound_holds_under_many_distinct_tokens() {
        let mut cache = NegativeCache::new(Duration::from_secs(60), 100);
        let now = Instant::now();
        for n in 0..10_000u32 {
            cache.insert(digest(&n.to_string()), refusal("r"), now);
        }
        assert_eq!(cache.len(), 100);
        assert!(cache.get(&digest("9999"), now).is_some());
        assert!(cache.get(&digest("9899"), now).is_none());
    }

    #[test]
    fn which_refusals_are_remembered() {
        let cases = [
            (TokenError::Malformed("x".into()), true),
            (TokenError::BadSignature("x".into()), true),
            (
                TokenError::WrongAudience {
                    expected: "a".into(),
                },
                true,
            ),
            (
                TokenError::WrongIssuer {
                    got: "a".into(),
                    expected: "b".into(),
                },
                true,
            ),
            (TokenError::Expired, true),
            (TokenError::NoServiceAccount("x".into()), true),
            (TokenError::Rejected("x".into()), true),
            (TokenError::NotYetValid, false),
            (TokenError::Unavailable("down".into()), false),
        ];
        for (e, want) in cases {
            assert_eq!(remembered(&e), want, "{e:?}");
        }
    }

    #[test]
    fn digest_is_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let got: String = digest("abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
    }
}
