//! What the running kernel supports: the SA encoding it accepts
//! ([`KernelFlavor`]) and the probe that installs throwaway SAs and turns a
//! failure into one actionable diagnosis (which module or option is missing).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_xfrm::{
    Alg, UserOffloadDev, XfrmAttrs, XfrmMessage, XFRM_OFFLOAD_INBOUND, XFRM_OFFLOAD_IPV6,
};

use super::super::offload::{self, OffloadEnv, OffloadReport, SysModules};
use super::super::{
    AddressFamily, Aead, Datapath, DatapathError, Direction, ErrorKind, Lifetimes, Op, Reqid, SaId,
    SaSpec, MIN_INBOUND_REPLAY_WINDOW,
};
use super::msg::{name64, sa_message};
use super::XfrmDatapath;

/// What the running kernel accepts for SA direction and replay windows.
///
/// With ESN, kernels before 6.10 refuse a replay window of 0 on any SA, so an
/// outbound SA gets the smallest legal window, 1 (the window is only ever
/// checked on input, so it costs nothing). Linux ≥ 6.10 knows SA directions
/// (`XFRMA_SA_DIR`) and requires window 0 and an empty bitmap on an SA marked
/// outbound. Both modes install the same datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFlavor {
    /// Send `XFRMA_SA_DIR` and use outbound window 0.
    pub sa_dir: bool,
}

impl KernelFlavor {
    /// Pre-6.10 behaviour: no direction attribute, outbound window 1.
    pub const LEGACY: KernelFlavor = KernelFlavor { sa_dir: false };
    /// ≥ 6.10 behaviour: `XFRMA_SA_DIR`, outbound window 0.
    pub const DIRECTIONAL: KernelFlavor = KernelFlavor { sa_dir: true };

    /// Decide from `uname -r`.
    pub fn detect() -> KernelFlavor {
        // SAFETY: utsname is plain data; uname fills it.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        if unsafe { libc::uname(&mut u) } != 0 {
            return KernelFlavor::LEGACY;
        }
        let rel: Vec<u8> = u
            .release
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        Self::from_release(&String::from_utf8_lossy(&rel))
    }

    /// Decide from a kernel release string such as `6.1.0-56-amd64`.
    pub fn from_release(release: &str) -> KernelFlavor {
        let mut it = release
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty());
        let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let minor: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        KernelFlavor {
            sa_dir: (major, minor) >= (6, 10),
        }
    }

    /// The ESN replay window an outbound SA carries.
    pub fn outbound_window(self) -> u32 {
        if self.sa_dir {
            0
        } else {
            1
        }
    }
}

impl XfrmDatapath {
    fn throwaway_pair(family: AddressFamily) -> (IpAddr, IpAddr) {
        // Documentation prefixes (RFC 5737 / RFC 3849): never routed, never a
        // real peer, so a transient SA on them cannot capture any traffic.
        match family {
            AddressFamily::V4 => (
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
            ),
            AddressFamily::V6 => (
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0x6d73, 1)),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0x6d73, 2)),
            ),
        }
    }

    pub(super) fn probe_family(
        &mut self,
        aead: Aead,
        family: AddressFamily,
    ) -> Result<(), DatapathError> {
        let (src, dst) = Self::throwaway_pair(family);
        let mut spec = probe_sa(src, dst, 0, aead);
        let spi = match self.alloc_spi(src, dst, Reqid::PROBE) {
            Ok(spi) => spi,
            Err(e) if e.kind() == ErrorKind::Permission => return Err(permission()),
            Err(e) if e.errno() == Some(libc::EAFNOSUPPORT) => {
                return Err(DatapathError::Unsupported {
                    what: format!("kernel has no {family} XFRM support ({e})"),
                    fix: match family {
                        AddressFamily::V4 => "enable CONFIG_INET".into(),
                        AddressFamily::V6 => "enable IPv6 (CONFIG_IPV6, no ipv6.disable=1)".into(),
                    },
                })
            }
            Err(e) => return Err(e),
        };
        spec.spi = spi;
        let filled = self.update_sa(&spec);
        // Also the outbound flavour (direction/replay-window rules differ).
        let mut out = spec.clone();
        out.direction = Direction::Out;
        let outbound = if filled.is_ok() {
            // A kernel-chosen SPI is free by construction; release its larval
            // SA and add the outbound flavour under it.
            self.alloc_spi(src, dst, Reqid::PROBE).and_then(|s| {
                out.spi = s;
                self.delete_sa(out.id())?;
                self.install_sa(&out)
            })
        } else {
            Ok(())
        };
        let _ = self.delete_sa(spec.id());
        if outbound.is_ok() && filled.is_ok() {
            let _ = self.delete_sa(out.id());
        }
        match filled.and(outbound) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.diagnose(aead, family, e)),
        }
    }

    /// Make sure ESP GSO offload is loaded for `families` (see
    /// [`offload`]): already loaded, else the kernel's own autoload through
    /// [`Self::offload_probe_sa`], else `modprobe`. Never fails.
    pub(crate) fn ensure_offload(
        &mut self,
        aead: Aead,
        families: &[AddressFamily],
        modules: &SysModules,
    ) -> OffloadReport {
        struct Env<'a> {
            dp: &'a mut XfrmDatapath,
            aead: Aead,
            modules: &'a SysModules,
        }
        impl OffloadEnv for Env<'_> {
            fn loaded(&mut self, family: AddressFamily) -> bool {
                self.modules.loaded(offload::module(family))
            }
            fn autoload(&mut self, family: AddressFamily) -> Result<(), String> {
                self.dp
                    .offload_probe_sa(self.aead, family)
                    .map_err(|e| e.to_string())
            }
            fn modprobe(&mut self, family: AddressFamily) -> Result<(), String> {
                offload::run_modprobe(offload::module(family))
            }
        }
        offload::ensure(
            &mut Env {
                dp: self,
                aead,
                modules,
            },
            families,
        )
    }

    /// Add and delete a throwaway inbound SA that asks for offload to `lo`.
    /// Adding it makes the kernel request `xfrm-offload-<AF>-50` (the
    /// family's offload module) through its own module autoload, which needs
    /// only `CAP_NET_ADMIN`; `lo` has no offload driver, so the SA falls back
    /// to software and the add succeeds (checked on Debian's 6.1). From 6.15
    /// the kernel requests the module only for devices that offload, so this
    /// loads nothing there (the caller then tries modprobe).
    pub(crate) fn offload_probe_sa(
        &mut self,
        aead: Aead,
        family: AddressFamily,
    ) -> Result<(), DatapathError> {
        let (src, dst) = Self::throwaway_pair(family);
        let lo = std::ffi::CString::new("lo").expect("no NUL");
        // SAFETY: a valid C string; the call only reads it.
        let ifindex = unsafe { libc::if_nametoindex(lo.as_ptr()) };
        if ifindex == 0 {
            return Err(DatapathError::Invalid {
                op: Op::Probe,
                reason: "no loopback interface in this network namespace".into(),
            });
        }
        let spi = self.alloc_spi(src, dst, Reqid::PROBE)?;
        let spec = probe_sa(src, dst, spi, aead);
        // Release the larval SA: a kernel-chosen SPI is free by construction.
        self.delete_sa(spec.id())?;
        let mut msg = sa_message(&spec, self.flavor);
        msg.nlas.push(XfrmAttrs::OffloadDevice(UserOffloadDev {
            ifindex: ifindex as i32,
            flags: XFRM_OFFLOAD_INBOUND
                | match family {
                    AddressFamily::V4 => 0,
                    AddressFamily::V6 => XFRM_OFFLOAD_IPV6,
                },
        }));
        let id = spec.id();
        self.one(
            Op::Probe,
            &|| id.to_string(),
            XfrmMessage::AddSa(msg),
            false,
        )?;
        self.delete_sa(id)
    }

    /// Turn a failed probe SA into one actionable error.
    fn diagnose(&mut self, aead: Aead, family: AddressFamily, e: DatapathError) -> DatapathError {
        let msg = e.kernel_message().unwrap_or("").to_ascii_lowercase();
        if msg.contains("cryptographic") {
            return DatapathError::Unsupported {
                what: format!("kernel could not initialise {} for ESP: no default RNG for the IV generator ({e})", aead.kernel_name()),
                fix: "modprobe drbg (CONFIG_CRYPTO_DRBG)".into(),
            };
        }
        if e.kind() == ErrorKind::Permission {
            return permission();
        }
        let esp_missing = |this: &mut Self| -> bool {
            // Ask about ESP with an algorithm pair almost every kernel has,
            // so "no ESP" and "no such AEAD" can be told apart.
            let (src, dst) = Self::throwaway_pair(family);
            let mut info = sa_message(
                &SaSpec {
                    src,
                    dst,
                    spi: 0x6d73_0100,
                    direction: Direction::In,
                    reqid: Reqid::PROBE,
                    aead: Aead::Aes128Gcm,
                    key: vec![0; Aead::Aes128Gcm.key_len()].into(),
                    replay_window: MIN_INBOUND_REPLAY_WINDOW,
                    lifetimes: Lifetimes {
                        hard_seconds: 30,
                        ..Default::default()
                    },
                },
                KernelFlavor::LEGACY,
            );
            info.nlas = vec![
                XfrmAttrs::EncryptionAlg(Alg {
                    alg_name: name64("cbc(aes)"),
                    alg_key_len: 128,
                    alg_key: vec![0; 16],
                }),
                XfrmAttrs::AuthenticationAlg(Alg {
                    alg_name: name64("hmac(sha256)"),
                    alg_key_len: 256,
                    alg_key: vec![0; 32],
                }),
            ];
            info.user_sa_info.flags = 0;
            let id = SaId {
                dst,
                spi: 0x6d73_0100,
            };
            match this.one(
                Op::Probe,
                &|| id.to_string(),
                XfrmMessage::AddSa(info),
                false,
            ) {
                Ok(_) => {
                    let _ = this.delete_sa(id);
                    false
                }
                Err(e) => {
                    let m = e.kernel_message().unwrap_or("").to_ascii_lowercase();
                    m.contains("type not found") || e.errno() == Some(libc::EPROTONOSUPPORT)
                }
            }
        };
        if e.kind() == ErrorKind::Unsupported || msg.contains("not found") {
            if esp_missing(self) {
                let (opt, module) = match family {
                    AddressFamily::V4 => ("CONFIG_INET_ESP", "esp4"),
                    AddressFamily::V6 => ("CONFIG_INET6_ESP", "esp6"),
                };
                return DatapathError::Unsupported {
                    what: format!("kernel lacks ESP for {family} ({opt}, module {module}); the probe SA failed with: {e}"),
                    fix: format!("modprobe {module}"),
                };
            }
            let fix = match aead {
                Aead::Aes128Gcm | Aead::Aes256Gcm => {
                    "modprobe aesni_intel gcm (or aes_generic gcm ghash_generic; CONFIG_CRYPTO_GCM, CONFIG_CRYPTO_AES)"
                }
                Aead::ChaCha20Poly1305 => {
                    "modprobe chacha20poly1305 chacha_x86_64 poly1305_x86_64 (CONFIG_CRYPTO_CHACHA20POLY1305)"
                }
            };
            return DatapathError::Unsupported {
                what: format!("algorithm {} unavailable ({e})", aead.kernel_name()),
                fix: fix.into(),
            };
        }
        e
    }
}

pub(super) fn permission() -> DatapathError {
    DatapathError::Unsupported {
        what: "permission denied on XFRM netlink".into(),
        fix: "run meshsec as root or grant it CAP_NET_ADMIN".into(),
    }
}

/// A throwaway inbound SA for the probes (a fixed key; if the agent dies
/// mid-probe the kernel removes it by itself after 30 s).
fn probe_sa(src: IpAddr, dst: IpAddr, spi: u32, aead: Aead) -> SaSpec {
    SaSpec {
        src,
        dst,
        spi,
        direction: Direction::In,
        reqid: Reqid::PROBE,
        aead,
        key: vec![0x5a; aead.key_len()].into(),
        replay_window: MIN_INBOUND_REPLAY_WINDOW,
        lifetimes: Lifetimes {
            hard_seconds: 30,
            soft_seconds: 20,
            ..Default::default()
        },
    }
}
