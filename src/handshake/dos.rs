//! The responder's denial-of-service defence (proto/handshake.md §8).
//!
//! DH work is the resource to protect. A global token bucket budgets initiations; once it
//! runs dry the responder is "under load" for a while and does DH work only for initiations
//! whose mac2 proves the source address (with a cookie it sent there), each proven source IP
//! rate-limited on its own. Everything else gets a cookie reply, itself globally capped.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::RngCore;
use zeroize::Zeroizing;

use super::crypto::{mac16, mac_eq, make_cookie, seal_cookie, COOKIE_NONCE_LEN, MAC_LEN};
use super::ratelimit::{KeyedLimiter, TokenBucket};
use super::types::{Config, COOKIE_SECRET_LIFETIME};
use super::wire::{
    encode_cookie_reply, Initiation, COOKIE_REPLY_LEN, INITIATION_LEN, INITIATION_MAC2_OFF,
};

/// What the responder does with an initiation whose mac1 verified.
#[derive(Debug)]
pub(super) enum Admission {
    /// Not under load, or a valid mac2 within its source's rate: go on to the DH work.
    Proceed,
    /// Under load without a valid mac2: send this cookie reply to the source instead.
    CookieReply([u8; COOKIE_REPLY_LEN]),
    /// Under load and over the source's rate, or over the cookie-reply cap: drop it.
    RateLimited,
}

/// The rotating secret that binds cookies to source addresses.
struct CookieSecret {
    current: Zeroizing<[u8; 32]>,
    previous: Zeroizing<[u8; 32]>,
    rotated: Instant,
}

/// Load detection, cookies and rate limits of one endpoint.
///
/// Random bytes (cookie secrets, nonces) come from the endpoint's RNG, passed in, so a seeded
/// endpoint stays reproducible.
pub(super) struct DosGuard {
    under_load_hold: Duration,
    load_bucket: TokenBucket,
    under_load_until: Option<Instant>,
    sources: KeyedLimiter<IpAddr>,
    cookie_bucket: TokenBucket,
    cookie_secret: CookieSecret,
}

impl DosGuard {
    /// Full budgets, not under load, a fresh cookie secret.
    pub(super) fn new(now: Instant, config: &Config, rng: &mut StdRng) -> Self {
        let mut current = Zeroizing::new([0u8; 32]);
        let mut previous = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut *current);
        rng.fill_bytes(&mut *previous);
        DosGuard {
            under_load_hold: config.under_load_hold,
            load_bucket: TokenBucket::new(now, config.load_rate, config.load_burst),
            under_load_until: None,
            sources: KeyedLimiter::new(
                now,
                config.per_source_rate,
                config.per_source_burst,
                config.max_sources,
            ),
            cookie_bucket: TokenBucket::new(
                now,
                config.cookie_reply_rate,
                config.cookie_reply_burst,
            ),
            cookie_secret: CookieSecret {
                current,
                previous,
                rotated: now,
            },
        }
    }

    /// Whether cookies (mac2) are currently demanded before DH work.
    pub(super) fn is_under_load(&self, now: Instant) -> bool {
        self.under_load_until.is_some_and(|t| now < t)
    }

    /// Spends DH budget on initiation `m` from `from`, or decides it needs a cookie first.
    /// `cookie_key` seals a cookie reply (derived from the keyring secret `m`'s mac1 used).
    pub(super) fn admit(
        &mut self,
        now: Instant,
        from: SocketAddr,
        m: &Initiation<'_>,
        cookie_key: &[u8; 32],
        rng: &mut StdRng,
    ) -> Admission {
        if !self.is_under_load(now) && !self.load_bucket.take(now) {
            self.under_load_until = Some(now + self.under_load_hold);
            tracing::debug!("handshake: under load, demanding cookies");
        }
        if !self.is_under_load(now) {
            return Admission::Proceed;
        }
        // Keep extending while the budget stays exhausted.
        if !self.load_bucket.take(now) {
            self.under_load_until = Some(now + self.under_load_hold);
        }
        if !self.mac2_valid(now, &from, m.bytes, rng) {
            return self.cookie_reply(now, from, m, cookie_key, rng);
        }
        if !self.sources.take(now, &from.ip()) {
            return Admission::RateLimited;
        }
        Admission::Proceed
    }

    /// Test hook: fixes the cookie secret and forces the under-load state until `until`.
    #[cfg(test)]
    pub(super) fn force_under_load(&mut self, now: Instant, until: Instant, secret: [u8; 32]) {
        self.cookie_secret = CookieSecret {
            current: Zeroizing::new(secret),
            previous: Zeroizing::new(secret),
            rotated: now,
        };
        self.under_load_until = Some(until);
    }

    fn mac2_valid(
        &mut self,
        now: Instant,
        from: &SocketAddr,
        bytes: &[u8; INITIATION_LEN],
        rng: &mut StdRng,
    ) -> bool {
        self.rotate_cookie_secret(now, rng);
        let got: &[u8; MAC_LEN] = bytes[INITIATION_MAC2_OFF..]
            .try_into()
            .expect("fixed-size slice");
        [&self.cookie_secret.current, &self.cookie_secret.previous]
            .iter()
            .any(|secret| {
                let cookie = make_cookie(secret, from);
                mac_eq(&mac16(&cookie, &[&bytes[..INITIATION_MAC2_OFF]]), got)
            })
    }

    fn rotate_cookie_secret(&mut self, now: Instant, rng: &mut StdRng) {
        if now.saturating_duration_since(self.cookie_secret.rotated) >= COOKIE_SECRET_LIFETIME {
            let mut fresh = Zeroizing::new([0u8; 32]);
            rng.fill_bytes(&mut *fresh);
            self.cookie_secret.previous = std::mem::replace(&mut self.cookie_secret.current, fresh);
            self.cookie_secret.rotated = now;
        }
    }

    fn cookie_reply(
        &mut self,
        now: Instant,
        to: SocketAddr,
        m: &Initiation<'_>,
        cookie_key: &[u8; 32],
        rng: &mut StdRng,
    ) -> Admission {
        if !self.cookie_bucket.take(now) {
            return Admission::RateLimited;
        }
        self.rotate_cookie_secret(now, rng);
        let cookie = make_cookie(&self.cookie_secret.current, &to);
        let mut nonce = [0u8; COOKIE_NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let sealed = seal_cookie(cookie_key, &nonce, m.mac1, &cookie);
        Admission::CookieReply(encode_cookie_reply(m.sender_index, &nonce, &sealed))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::handshake::crypto::open_cookie;
    use crate::handshake::noise::put_mac2;
    use crate::handshake::wire::{
        decode, encode_initiation, Message, INITIATION_MAC1_OFF, NOISE_INIT_LEN,
    };

    const KEY: [u8; 32] = [7; 32];

    fn admit(g: &mut DosGuard, now: Instant, from: &str, p: &[u8], rng: &mut StdRng) -> Admission {
        let Ok(Message::Initiation(m)) = decode(p) else {
            panic!("not an initiation")
        };
        g.admit(now, from.parse().unwrap(), &m, &KEY, rng)
    }

    #[test]
    fn budget_then_cookies_then_proven_sources() {
        let now = Instant::now();
        let config = Config {
            load_rate: 1,
            load_burst: 2,
            per_source_burst: 1,
            per_source_rate: 1,
            ..Config::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mut g = DosGuard::new(now, &config, &mut rng);
        let mut packet = encode_initiation(5, &[0; NOISE_INIT_LEN]);
        let a = "127.0.0.1:1";
        for _ in 0..2 {
            let r = admit(&mut g, now, a, &packet, &mut rng);
            assert!(matches!(r, Admission::Proceed), "{r:?}");
        }
        assert!(!g.is_under_load(now));
        let Admission::CookieReply(reply) = admit(&mut g, now, a, &packet, &mut rng) else {
            panic!("budget spent: a cookie is demanded")
        };
        assert!(g.is_under_load(now));
        let Ok(Message::CookieReply(c)) = decode(&reply) else {
            panic!("not a cookie reply")
        };
        assert_eq!(c.receiver_index, 5);
        let mac1: [u8; MAC_LEN] = packet[INITIATION_MAC1_OFF..INITIATION_MAC2_OFF]
            .try_into()
            .unwrap();
        let cookie = open_cookie(&KEY, c.nonce, &mac1, c.sealed).unwrap();
        put_mac2(&mut packet, INITIATION_MAC2_OFF, &cookie);
        let r = admit(&mut g, now, a, &packet, &mut rng);
        assert!(matches!(r, Admission::Proceed), "valid mac2: {r:?}");
        let r = admit(&mut g, now, a, &packet, &mut rng);
        assert!(
            matches!(r, Admission::RateLimited),
            "per-source burst 1: {r:?}"
        );
        let r = admit(&mut g, now, "127.0.0.2:1", &packet, &mut rng);
        assert!(
            matches!(r, Admission::CookieReply(_)),
            "mac2 is bound to the source: {r:?}"
        );
        let later = now + config.under_load_hold + Duration::from_secs(5);
        assert!(!g.is_under_load(later));
    }
}
