//! The responder's denial-of-service defence (proto/handshake.md §8).
//!
//! DH work is the resource to protect. A global token bucket budgets initiations; once it
//! runs dry the responder is "under load" for a while and does DH work only for initiations
//! whose mac2 proves the source address (with a cookie it sent there), within a second global
//! budget shared fairly among source prefixes (IPv4 /32, IPv6 /64), each prefix also limited
//! on its own. Everything else gets a cookie reply, itself globally capped. Under load each
//! member's static key is limited too, once the initiation has been read (see
//! [`DosGuard::admit_peer`]).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::RngCore;
use zeroize::Zeroizing;

use super::crypto::{mac16, mac_eq, make_cookie, seal_cookie, COOKIE_NONCE_LEN, MAC_LEN};
use super::ratelimit::{KeyedLimiter, TokenBucket};
use super::types::{Config, PublicKey, COOKIE_SECRET_LIFETIME};
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
    /// Under load and over the source prefix's share or the proven-source budget, or over
    /// the cookie-reply cap: drop it.
    RateLimited,
}

/// What one source is limited as: its IPv4 address, or its IPv6 /64 (one host or link holds
/// a whole /64, so its addresses are one source). IPv4-mapped IPv6 counts as IPv4.
pub(super) fn source_prefix(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        v4 => v4,
    }
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
    /// Keyed by [`source_prefix`], sharing the proven-source budget.
    sources: KeyedLimiter<IpAddr>,
    peers: KeyedLimiter<PublicKey>,
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
            sources: KeyedLimiter::with_shared_budget(
                now,
                config.per_source_rate,
                config.per_source_burst,
                config.max_sources,
                TokenBucket::new(now, config.proven_rate, config.proven_burst),
            ),
            peers: KeyedLimiter::new(
                now,
                config.per_peer_rate,
                config.per_peer_burst,
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
        if !self.sources.take(now, &source_prefix(from.ip())) {
            return Admission::RateLimited;
        }
        Admission::Proceed
    }

    /// Under load, whether an initiation from static key `peer` may go on to the response.
    /// The key is only known once the initiation is decrypted, so its DH work (es, ss) is
    /// already spent; this bounds what follows per key: the response's DH work (ee, se), SPI
    /// allocations, SA installs and session replacements. Callers check it after the replay
    /// check, so replays of a member's old initiations cannot use up that member's budget.
    pub(super) fn admit_peer(&mut self, now: Instant, peer: &PublicKey) -> bool {
        !self.is_under_load(now) || self.peers.take(now, peer)
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
    use crate::handshake::crypto::{make_cookie, open_cookie};
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

    const SECRET: [u8; 32] = [3; 32];

    /// A guard under load for `hold`, its cookie secret fixed to [`SECRET`].
    fn loaded(now: Instant, config: &Config, hold: Duration) -> (DosGuard, StdRng) {
        let mut rng = StdRng::seed_from_u64(1);
        let mut g = DosGuard::new(now, config, &mut rng);
        g.force_under_load(now, now + hold, SECRET);
        (g, rng)
    }

    /// An initiation whose mac2 proves `from` (it received our cookie there).
    fn proven(from: SocketAddr) -> Vec<u8> {
        let mut packet = encode_initiation(5, &[0; NOISE_INIT_LEN]).to_vec();
        put_mac2(
            &mut packet,
            INITIATION_MAC2_OFF,
            &make_cookie(&SECRET, &from),
        );
        packet
    }

    /// Every `step` for `secs`, each source sends one proven initiation, the sources spread
    /// evenly over the step (so that each takes a freed token at once); DH work granted to
    /// each source.
    fn hammer(
        g: &mut DosGuard,
        rng: &mut StdRng,
        t0: Instant,
        sources: &[SocketAddr],
        step: Duration,
        secs: f64,
    ) -> Vec<u64> {
        let sources: Vec<(String, Vec<u8>)> = sources
            .iter()
            .map(|s| (s.to_string(), proven(*s)))
            .collect();
        let mut granted = vec![0u64; sources.len()];
        let spread = step / u32::try_from(sources.len()).unwrap();
        let mut t = t0;
        while t < t0 + Duration::from_secs_f64(secs) {
            for (i, (n, (from, packet))) in granted.iter_mut().zip(&sources).enumerate() {
                let at = t + spread * u32::try_from(i).unwrap();
                *n += u64::from(dh_granted(g, at, from, packet, rng));
            }
            t += step;
        }
        granted
    }

    fn dh_granted(g: &mut DosGuard, t: Instant, from: &str, p: &[u8], rng: &mut StdRng) -> bool {
        match admit(g, t, from, p, rng) {
            Admission::Proceed => true,
            Admission::RateLimited => false,
            r @ Admission::CookieReply(_) => panic!("mac2 is valid: {r:?}"),
        }
    }

    /// The default configuration with this proven-source budget.
    fn proven_budget(proven_rate: u32, proven_burst: u32) -> Config {
        Config {
            proven_rate,
            proven_burst,
            ..Config::default()
        }
    }

    fn v6(prefix: u16, host: u16) -> SocketAddr {
        SocketAddr::new(
            format!("2001:db8:0:{prefix:x}::{host:x}").parse().unwrap(),
            4000,
        )
    }

    #[test]
    fn source_prefix_is_the_ipv4_address_or_the_ipv6_64() {
        for (ip, prefix) in [
            ("10.0.0.1", "10.0.0.1"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("::ffff:10.0.0.1", "10.0.0.1"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(source_prefix(ip), prefix.parse::<IpAddr>().unwrap(), "{ip}");
        }
    }

    #[test]
    fn proven_sources_stay_within_one_global_budget() {
        // The bypass: 150 proven addresses, each with its own per-source budget, hammering
        // for 0.3 s got ~1,500 DH operations against a budget of ~35.
        let now = Instant::now();
        let config = proven_budget(100, 5);
        let budget = 5 + 100 * 3 / 10 + 1;
        let ms = Duration::from_millis(5);
        let one_64: Vec<SocketAddr> = (1..=150).map(|h| v6(1, h)).collect();
        let (mut g, mut rng) = loaded(now, &config, Duration::from_secs(10));
        let dh: u64 = hammer(&mut g, &mut rng, now, &one_64, ms, 0.3).iter().sum();
        assert!(
            dh <= budget,
            "one /64 got {dh} DH operations, budget {budget}"
        );
        // One /64 is one source even when the global budget is generous: its own burst and
        // rate, 10 + 20 × 0.3.
        let generous = proven_budget(100_000, 10_000);
        let (mut g, mut rng) = loaded(now, &generous, Duration::from_secs(10));
        let dh: u64 = hammer(&mut g, &mut rng, now, &one_64, ms, 0.3).iter().sum();
        assert!(dh <= 10 + 6, "one /64 got {dh} DH operations");
        // 150 different /64s share the global budget.
        let many_64s: Vec<SocketAddr> = (1..=150).map(|p| v6(p, 1)).collect();
        let (mut g, mut rng) = loaded(now, &config, Duration::from_secs(10));
        let dh: u64 = hammer(&mut g, &mut rng, now, &many_64s, ms, 0.3)
            .iter()
            .sum();
        assert!(
            dh <= budget,
            "150 /64s got {dh} DH operations, budget {budget}"
        );
    }

    #[test]
    fn proven_ipv4_sources_in_different_32s_each_get_their_share() {
        // 20 addresses of one /24, each sending every 10 ms: each is its own source; 2 s
        // against a budget of 20/s.
        let now = Instant::now();
        let config = proven_budget(20, 20);
        let sources: Vec<SocketAddr> = (1..=20u8)
            .map(|h| SocketAddr::new([10, 0, 0, h].into(), 4000))
            .collect();
        let (mut g, mut rng) = loaded(now, &config, Duration::from_secs(10));
        let granted = hammer(
            &mut g,
            &mut rng,
            now,
            &sources,
            Duration::from_millis(10),
            2.0,
        );
        let total: u64 = granted.iter().sum();
        assert!(
            total <= 20 + 20 * 2 + 1,
            "{total} over the budget: {granted:?}"
        );
        // Fair share: 20/s among 20 sources, about 2 each.
        let (min, max) = (granted.iter().min(), granted.iter().max());
        assert!(min >= Some(&1) && max <= Some(&4), "{granted:?}");
    }

    #[test]
    fn honest_proven_source_gets_through_while_an_attacker_floods() {
        // The attacker proves 128 addresses in 64 /64s and sends from each every 10 ms; the
        // honest member sends every 250 ms from its own address.
        let now = Instant::now();
        let config = proven_budget(100, 5);
        let sources: Vec<SocketAddr> = (0..128u16).map(|i| v6(i % 64, i)).collect();
        let honest = "[2001:db8:ffff:1::7]:4000";
        let honest_packet = proven(honest.parse().unwrap());
        let (mut g, mut rng) = loaded(now, &config, Duration::from_secs(10));
        let mut honest_granted = 0;
        let mut attacker_granted = 0;
        for quarter in 0..12u32 {
            let t = now + Duration::from_millis(250) * quarter;
            // The honest initiation arrives right after an attacker round, which had the
            // first pick of the global budget.
            let ms = Duration::from_millis(10);
            attacker_granted += hammer(&mut g, &mut rng, t, &sources, ms, 0.001)
                .iter()
                .sum::<u64>();
            honest_granted += u64::from(dh_granted(&mut g, t, honest, &honest_packet, &mut rng));
            let rest = hammer(&mut g, &mut rng, t + ms, &sources, ms, 0.24);
            attacker_granted += rest.iter().sum::<u64>();
        }
        assert!(
            attacker_granted + honest_granted <= 5 + 100 * 3 + 1,
            "attacker {attacker_granted}, honest {honest_granted}"
        );
        // Its share is 100/65 per second: about 4 in 3 s.
        assert!(honest_granted >= 3, "honest got {honest_granted} of 12");
    }

    /// Attack review (2026-11-30): a member routing a /52 proves one address in each of 4,000
    /// /64s (fewer than `max_sources`, so the table is not full) and sends one initiation from
    /// each every 2 s, ~2,000 packets/s (which also keeps the responder under load by itself).
    /// When every new prefix brought a full burst (10), the attacker held a reservoir of 40,000
    /// tokens and took every token of the shared 1000/s budget as it accrued, while an honest
    /// source asking when the budget was dry spent its own token anyway (by design, against
    /// hoarding): an honest member trying once a second got no DH work for 30 s, longer than
    /// `handshake_timeout` (20 s). Now a prefix's burst is split like its rate (the shared burst
    /// over the prefixes tracked, at least 1), and a new prefix starts with that much.
    #[test]
    fn honest_source_gets_its_share_while_a_member_floods_from_4000_64s() {
        let now = Instant::now();
        let config = Config::default();
        let n = 4_000;
        assert!(n < config.max_sources);
        let attacker: Vec<(String, Vec<u8>)> = (0..n)
            .map(|p| {
                let from = v6(u16::try_from(p).unwrap(), 1);
                (from.to_string(), proven(from))
            })
            .collect();
        let honest = "[2001:db8:ffff:1::7]:4000";
        let honest_packet = proven(honest.parse().unwrap());
        let (mut g, mut rng) = loaded(now, &config, Duration::from_secs(60));
        // The flood is already on when the honest member starts.
        let round = Duration::from_secs(2);
        let spread = round / u32::try_from(n).unwrap();
        for (i, (from, packet)) in attacker.iter().enumerate() {
            let at = now + spread * u32::try_from(i).unwrap();
            let _ = admit(&mut g, at, from, packet, &mut rng);
        }
        // Then for 30 s: the attacker keeps sending from each prefix every 2 s, the honest
        // member tries once a second.
        let secs = 30u32;
        let mut next = 0usize;
        let mut honest_granted = 0;
        for sec in 0..secs {
            let t0 = now + round + Duration::from_secs(1) * sec;
            for j in 0..n / 2 {
                let (from, packet) = &attacker[next % n];
                next += 1;
                let at = t0 + spread * u32::try_from(j).unwrap();
                let _ = admit(&mut g, at, from, packet, &mut rng);
            }
            let at = t0 + Duration::from_millis(999);
            honest_granted += u64::from(dh_granted(&mut g, at, honest, &honest_packet, &mut rng));
        }
        // Its fair share is 1000/4001 per second plus a burst of 10.
        assert!(honest_granted >= 1, "honest got {honest_granted} of {secs}");
    }
}
