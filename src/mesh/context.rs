//! The mesh's side of the handshake endpoint ([`HandshakeContext`]): who
//! is a member, SPI reservations, and the responder's inbound SA installed
//! before its response can leave (with the address proof).

use std::collections::BTreeMap;

use super::plan::link_objects;
use super::{Link, LinkId, MeshCounters, Target};
use crate::datapath::{
    AddressFamily, Change, Datapath, ErrorKind, KernelState, Lifetimes, Reqid, SaId,
};
use crate::handshake::{HandshakeContext, PublicKey, Session, SpiAllocError};

pub(super) struct Ctx<'a> {
    pub(super) family: AddressFamily,
    pub(super) links: &'a BTreeMap<LinkId, Link>,
    pub(super) dp: &'a mut dyn Datapath,
    pub(super) lifetimes: Lifetimes,
    pub(super) counters: &'a mut MeshCounters,
    /// The mesh's record of the kernel: the inbound SA goes in it.
    pub(super) kernel: &'a mut Option<KernelState>,
}

impl Ctx<'_> {
    fn target(&self, peer: &PublicKey) -> Result<&Target, SpiAllocError> {
        self.links
            .get(&LinkId {
                peer: *peer,
                family: self.family,
            })
            .map(|l| &l.target)
            .ok_or_else(|| SpiAllocError("not a member".into()))
    }
}

impl HandshakeContext for Ctx<'_> {
    fn is_member(&self, peer: &PublicKey) -> bool {
        self.links.contains_key(&LinkId {
            peer: *peer,
            family: self.family,
        })
    }

    fn alloc_spi(&mut self, peer: &PublicKey) -> Result<u32, SpiAllocError> {
        let target = self.target(peer)?;
        let (remote, local) = (target.remote, target.local);
        self.dp
            .alloc_spi(remote, local, Reqid::DEFAULT)
            .map_err(|e| SpiAllocError(e.to_string()))
    }

    /// The responder's inbound SA goes in here, inside the endpoint's
    /// handling of the initiation and before its response is queued, so no
    /// driver order can let the response overtake the SA. It fills the SPI
    /// reservation through the same pipelined apply as every other write.
    fn install_inbound(&mut self, session: &Session) -> Result<(), SpiAllocError> {
        let target = self.target(&session.peer)?.clone();
        // Address proof: a peer's handshake comes from its own data address.
        if session.peer_addr.ip() != target.remote {
            self.counters.refused_wrong_source += 1;
            let _ = self.dp.delete_sa(SaId {
                dst: target.local,
                spi: session.local_spi,
            });
            return Err(SpiAllocError(format!(
                "initiation from {} for a peer at {}",
                session.peer_addr.ip(),
                target.remote
            )));
        }
        let (inbound, _, _) = link_objects(&target, session, self.lifetimes);
        let id = inbound.id();
        let recorded = super::keyless(&inbound);
        let fill = [Change::FillSa(inbound)];
        let mut result = self.dp.apply(&fill).pop().unwrap_or(Ok(()));
        if let (Err(e), Change::FillSa(sa)) = (&result, &fill[0]) {
            if e.kind() == ErrorKind::NotFound {
                // The reservation expired: add the SA under the same SPI.
                result = self.dp.install_sa(sa);
            }
        }
        match result {
            Ok(()) => {
                self.counters.changes_applied += 1;
                if let Some(k) = self.kernel.as_mut() {
                    k.sas.insert(id, recorded);
                }
                Ok(())
            }
            Err(e) => {
                self.counters.changes_failed += 1;
                let _ = self.dp.delete_sa(id);
                Err(SpiAllocError(format!("{id}: {e}")))
            }
        }
    }
}
