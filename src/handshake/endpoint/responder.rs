//! The responder side of the state machine: answering an initiation.

use std::net::SocketAddr;
use std::time::Instant;

use rand::Rng;

use super::{session_id, short, CachedResponse, Endpoint, PeerEntry, PeerState};
use crate::handshake::crypto::{derive_esp_keys, derive_mac1_key, mac16, mac_eq};
use crate::handshake::dos::Admission;
use crate::handshake::noise::{put_mac, responder_finish, responder_read};
use crate::handshake::types::{HandshakeContext, Rejected, Role, Session, MIN_SPI};
use crate::handshake::wire::{
    encode_response, InitPayload, Initiation, RespPayload, INITIATION_MAC1_OFF, RESPONSE_MAC1_OFF,
};

impl Endpoint {
    /// An initiation (proto/handshake.md §6): mac1, admission, cache, DH, membership,
    /// replay, per-key (under load) and collision checks, then the response and the session.
    pub(super) fn handle_initiation<C: HandshakeContext + ?Sized>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        m: Initiation<'_>,
        ctx: &mut C,
    ) -> Result<(), Rejected> {
        // 1. mac1: cheap, and identifies which keyring secret the initiator used.
        let secret_idx = self
            .secrets
            .iter()
            .position(|s| {
                mac_eq(
                    &mac16(&*s.mac1_to_us, &[&m.bytes[..INITIATION_MAC1_OFF]]),
                    m.mac1,
                )
            })
            .ok_or(Rejected::BadMac)?;

        // 2. Load: spend DH budget, or demand a cookie-proven source address.
        let cookie_key = &self.secrets[secret_idx].cookie_ours;
        match self.dos.admit(now, from, &m, cookie_key, &mut self.rng) {
            Admission::Proceed => {}
            Admission::CookieReply(reply) => {
                self.push_transmit(from, reply.to_vec());
                return Err(Rejected::CookieSent);
            }
            Admission::RateLimited => return Err(Rejected::RateLimited),
        }

        // 3. Exact retransmission of an initiation we already answered: resend, no DH.
        let eph: [u8; 32] = m.noise[..32]
            .try_into()
            .expect("32-byte prefix of a fixed array");
        if let Some(c) = self.cache.get(&eph) {
            if now < c.expires && c.initiation[..] == m.bytes[..INITIATION_MAC1_OFF] {
                let resp = c.response.to_vec();
                self.counters.retransmit_answered += 1;
                self.push_transmit(from, resp);
                return Ok(());
            }
        }

        // 4. DH work.
        self.counters.dh_work += 1;
        let fixed = self.fixed_ephemerals.pop_front();
        let (hs, peer, payload) = responder_read(
            &self.dh,
            &self.secrets[secret_idx].psk,
            fixed.as_ref(),
            m.noise,
        )
        .map_err(|_| Rejected::DecryptFailed)?;
        if &peer == self.keypair.public() || !ctx.is_member(&peer) {
            return Err(Rejected::UnknownPeer);
        }
        let payload = InitPayload::decode(&payload).map_err(|_| Rejected::BadPayload)?;
        if payload.spi < MIN_SPI {
            return Err(Rejected::BadPayload);
        }
        if payload.alg != self.config.algorithm.id() {
            return Err(Rejected::AlgMismatch);
        }
        let entry = self.peers.entry(peer).or_insert_with(PeerEntry::new);
        if payload.timestamp <= entry.last_accepted_ts {
            return Err(Rejected::Replayed);
        }
        // Under load, per static key: after the replay check, so that replays of old
        // initiations cannot spend the member's budget.
        if !self.dos.admit_peer(now, &peer) {
            return Err(Rejected::PeerRateLimited);
        }

        // 5. Simultaneous initiation: the lower static key is the initiator.
        let mut reuse_spi = None;
        if let PeerState::Initiating(st) = &entry.state {
            if self.keypair.public() < &peer {
                self.resend_after_collision(now, &peer);
                return Err(Rejected::CollisionDropped);
            }
            reuse_spi = Some(st.local_spi);
        }
        let local_spi = match reuse_spi {
            Some(s) => s,
            None => match ctx.alloc_spi(&peer) {
                Ok(s) if s >= MIN_SPI => s,
                _ => return Err(Rejected::SpiAllocFailed),
            },
        };
        if reuse_spi.is_some() {
            if let PeerState::Initiating(st) = std::mem::replace(&mut entry.state, PeerState::Idle)
            {
                self.indices.remove(&st.sender_index);
            }
            self.counters.collision_abandoned += 1;
            tracing::debug!(peer = %short(&peer), "handshake: collision, abandoning our initiation");
        }

        // 6. Respond and complete. Our timestamp is greater than any initiation we have made,
        // including one just abandoned.
        let responder_ts = self.next_timestamp(now);
        let alg = self.config.algorithm;
        let resp_payload = RespPayload {
            spi: local_spi,
            alg: alg.id(),
            timestamp: responder_ts,
        };
        let (noise, split) = match responder_finish(hs, &resp_payload.encode()) {
            Ok(x) => x,
            Err(_) => return Err(Rejected::DecryptFailed),
        };
        let sender_index = self
            .fixed_indices
            .pop_front()
            .unwrap_or_else(|| self.rng.gen());
        let mut resp = encode_response(sender_index, m.sender_index, &noise);
        put_mac(
            &mut resp,
            RESPONSE_MAC1_OFF,
            &derive_mac1_key(&self.secrets[secret_idx].secret, &peer),
        );

        let (i2r, r2i) = derive_esp_keys(&split.k1, &split.k2, &split.hash, alg);
        let session = Session {
            peer,
            peer_addr: from,
            role: Role::Responder,
            session_id: session_id(&split.hash),
            local_spi,
            peer_spi: payload.spi,
            algorithm: alg,
            key_out: r2i,
            key_in: i2r,
            initiator_timestamp: payload.timestamp,
            started_at: now,
            established_at: now,
        };
        // The inbound SA goes in before the response can leave: the initiator
        // switches to the new SAs as soon as the response reaches it.
        if ctx.install_inbound(&session).is_err() {
            return Err(Rejected::InstallFailed);
        }

        if let Some(e) = self.peers.get_mut(&peer) {
            e.last_accepted_ts = payload.timestamp;
        }
        self.cache.retain(|_, c| c.peer != peer && now < c.expires);
        let mut initiation = [0u8; INITIATION_MAC1_OFF];
        initiation.copy_from_slice(&m.bytes[..INITIATION_MAC1_OFF]);
        self.cache.insert(
            eph,
            CachedResponse {
                peer,
                initiation,
                response: resp,
                expires: now + self.config.response_cache_ttl,
            },
        );
        self.push_transmit(from, resp.to_vec());

        self.established(session);
        Ok(())
    }
}
