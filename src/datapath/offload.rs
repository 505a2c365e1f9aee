//! ESP GSO offload: making sure `esp4_offload` / `esp6_offload` are loaded
//! before the first SA.
//!
//! These modules give ESP GSO/GRO (the stack builds large segments and splits
//! them just before encryption): about twice the single-stream throughput in
//! this project's measurements. The kernel requests them by itself only when
//! an SA asks for hardware offload (`XFRMA_OFFLOAD_DEV`), and an SA created
//! while the module was absent never uses it, so a stock host runs ESP without
//! GSO unless something loads them first.
//!
//! The decision ([`ensure`]) is sans-IO: it asks an [`OffloadEnv`] whether the
//! module is there, then tries the kernel's own autoload (a throwaway SA that
//! carries `XFRMA_OFFLOAD_DEV` on `lo`, which needs only `CAP_NET_ADMIN`),
//! then `modprobe` (needs `CAP_SYS_MODULE`), re-checking after each. It never
//! fails: the caller logs [`warning`] when a family stays without offload.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::AddressFamily;

/// The module giving ESP GSO for a family.
pub fn module(family: AddressFamily) -> &'static str {
    match family {
        AddressFamily::V4 => "esp4_offload",
        AddressFamily::V6 => "esp6_offload",
    }
}

/// The key a family has in [`OffloadReport`] and `meshsec status --json`.
pub fn family_key(family: AddressFamily) -> &'static str {
    match family {
        AddressFamily::V4 => "v4",
        AddressFamily::V6 => "v6",
    }
}

/// Whether ESP GSO offload is available for a family, and how it got there.
/// Anything but `Absent` means SAs created from now on use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadState {
    /// Already loaded (or built into the kernel) when the agent started.
    Loaded,
    /// Loaded by the kernel's module autoload, requested by the agent's probe SA.
    Autoloaded,
    /// Loaded by the agent running `modprobe`.
    Modprobed,
    /// Not available: ESP runs without GSO for this family.
    Absent,
}

impl OffloadState {
    /// GSO offload is active for SAs created from now on.
    pub fn active(self) -> bool {
        self != OffloadState::Absent
    }
}

impl fmt::Display for OffloadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OffloadState::Loaded => "loaded",
            OffloadState::Autoloaded => "loaded (kernel autoload, requested by the agent)",
            OffloadState::Modprobed => "loaded (modprobe by the agent)",
            OffloadState::Absent => "absent: ESP without GSO",
        })
    }
}

/// What [`ensure`] found for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyOffload {
    /// The family.
    pub family: AddressFamily,
    /// The outcome.
    pub state: OffloadState,
    /// Why each attempt failed (only when `state` is `Absent`): the autoload
    /// and modprobe errors, in order.
    pub failures: Vec<String>,
}

/// ESP GSO offload per family, as the probe found it (empty for the
/// in-memory datapath).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffloadReport {
    /// One entry per family probed, in the order given.
    pub families: Vec<FamilyOffload>,
}

impl OffloadReport {
    /// `{"v4": state, "v6": state}` for `meshsec status`.
    pub fn by_key(&self) -> BTreeMap<String, OffloadState> {
        self.families
            .iter()
            .map(|f| (family_key(f.family).to_string(), f.state))
            .collect()
    }
}

/// The effects [`ensure`] needs, one family at a time.
pub trait OffloadEnv {
    /// Is the family's offload module loaded (or built in)?
    fn loaded(&mut self, family: AddressFamily) -> bool;
    /// Have the kernel autoload it (an SA carrying `XFRMA_OFFLOAD_DEV`);
    /// `Err` says why the attempt itself failed.
    fn autoload(&mut self, family: AddressFamily) -> Result<(), String>;
    /// Run `modprobe MODULE`; `Err` says why it failed.
    fn modprobe(&mut self, family: AddressFamily) -> Result<(), String>;
}

/// Make sure each family's offload module is loaded: check, kernel autoload,
/// check, modprobe, check. Never fails; `Absent` entries carry the reasons.
pub fn ensure(env: &mut dyn OffloadEnv, families: &[AddressFamily]) -> OffloadReport {
    let mut out = Vec::new();
    for &family in families {
        let mut failures = Vec::new();
        let state = if env.loaded(family) {
            OffloadState::Loaded
        } else {
            match env.autoload(family) {
                Ok(()) => {}
                Err(e) => failures.push(format!("kernel autoload: {e}")),
            }
            if env.loaded(family) {
                OffloadState::Autoloaded
            } else {
                if failures.is_empty() {
                    failures.push(
                        "kernel autoload: the offload SA was accepted but the module did not load"
                            .into(),
                    );
                }
                match env.modprobe(family) {
                    Ok(()) => {}
                    Err(e) => failures.push(format!("modprobe {}: {e}", module(family))),
                }
                if env.loaded(family) {
                    OffloadState::Modprobed
                } else {
                    if failures.len() < 2 {
                        failures.push(format!(
                            "modprobe {} succeeded but the module is not listed in /sys/module",
                            module(family)
                        ));
                    }
                    OffloadState::Absent
                }
            }
        };
        if state.active() {
            failures.clear();
        }
        out.push(FamilyOffload {
            family,
            state,
            failures,
        });
    }
    OffloadReport { families: out }
}

/// The one warning line for families left without offload (`None` when
/// every family has it).
pub fn warning(report: &OffloadReport) -> Option<String> {
    let absent: Vec<&FamilyOffload> = report
        .families
        .iter()
        .filter(|f| !f.state.active())
        .collect();
    if absent.is_empty() {
        return None;
    }
    let modules: Vec<&str> = absent.iter().map(|f| module(f.family)).collect();
    let why: Vec<String> = absent
        .iter()
        .map(|f| format!("{} ({})", module(f.family), f.failures.join("; ")))
        .collect();
    Some(format!(
        "ESP runs without GSO offload for {} (about half the single-stream speed): {} not loaded: {}; fix: run `modprobe {}` as root before the agent starts, or list them in /etc/modules-load.d/meshsec.conf",
        absent
            .iter()
            .map(|f| f.family.to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        modules.join(", "),
        why.join(", "),
        modules.join(" "),
    ))
}

/// Where loaded and built-in modules are listed: `/sys/module` and
/// `/lib/modules/RELEASE/modules.builtin` on a real system.
#[derive(Debug, Clone)]
pub struct SysModules {
    /// `/sys/module`.
    pub sys_module: PathBuf,
    /// `modules.builtin` of the running kernel.
    pub builtin_list: PathBuf,
}

impl SysModules {
    /// The running system's paths.
    pub fn system() -> SysModules {
        SysModules {
            sys_module: "/sys/module".into(),
            builtin_list: Path::new("/lib/modules")
                .join(kernel_release())
                .join("modules.builtin"),
        }
    }

    /// Loaded (a directory in /sys/module) or compiled in (listed in
    /// modules.builtin: a built-in module without parameters has no
    /// /sys/module entry).
    pub fn loaded(&self, name: &str) -> bool {
        if self.sys_module.join(name).is_dir() {
            return true;
        }
        let ko = format!("/{name}.ko");
        std::fs::read_to_string(&self.builtin_list)
            .map(|t| t.lines().any(|l| l.trim_end().ends_with(&ko)))
            .unwrap_or(false)
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Run `modprobe NAME` (from `PATH`, else /sbin or /usr/sbin: a service's
/// `PATH` may lack the sbin directories). `Err` carries modprobe's own words.
pub fn run_modprobe(name: &str) -> Result<(), String> {
    let mut last = String::from("modprobe not found");
    for prog in ["modprobe", "/sbin/modprobe", "/usr/sbin/modprobe"] {
        match Command::new(prog).arg(name).output() {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let line = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                return Err(format!("{} {}", o.status, line.trim()).trim().to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                last = format!("{prog} not found");
            }
            Err(e) => return Err(format!("cannot run {prog}: {e}")),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A host as the decision sees it: which modules load by which means.
    #[derive(Default)]
    struct Fake {
        loaded: BTreeSet<AddressFamily>,
        autoload_loads: bool,
        autoload_error: Option<String>,
        modprobe_loads: bool,
        modprobe_error: Option<String>,
        calls: Vec<String>,
    }

    impl OffloadEnv for Fake {
        fn loaded(&mut self, f: AddressFamily) -> bool {
            self.calls.push(format!("loaded {f:?}"));
            self.loaded.contains(&f)
        }
        fn autoload(&mut self, f: AddressFamily) -> Result<(), String> {
            self.calls.push(format!("autoload {f:?}"));
            if self.autoload_loads {
                self.loaded.insert(f);
            }
            self.autoload_error.clone().map_or(Ok(()), Err)
        }
        fn modprobe(&mut self, f: AddressFamily) -> Result<(), String> {
            self.calls.push(format!("modprobe {f:?}"));
            if self.modprobe_loads {
                self.loaded.insert(f);
            }
            self.modprobe_error.clone().map_or(Ok(()), Err)
        }
    }

    const BOTH: [AddressFamily; 2] = [AddressFamily::V4, AddressFamily::V6];

    #[test]
    fn already_loaded_touches_nothing() {
        let mut f = Fake {
            loaded: BOTH.into_iter().collect(),
            ..Fake::default()
        };
        let r = ensure(&mut f, &BOTH);
        assert_eq!(f.calls, ["loaded V4", "loaded V6"]);
        assert!(r.families.iter().all(|x| x.state == OffloadState::Loaded));
        assert_eq!(warning(&r), None);
    }

    #[test]
    fn kernel_autoload_first_and_no_modprobe_after_it() {
        let mut f = Fake {
            autoload_loads: true,
            modprobe_loads: true,
            ..Fake::default()
        };
        let r = ensure(&mut f, &[AddressFamily::V4]);
        assert_eq!(f.calls, ["loaded V4", "autoload V4", "loaded V4"]);
        assert_eq!(r.families[0].state, OffloadState::Autoloaded);
        assert!(r.families[0].failures.is_empty());
        assert_eq!(
            serde_json::to_string(&r.by_key()).unwrap(),
            r#"{"v4":"autoloaded"}"#
        );
    }

    #[test]
    fn modprobe_when_autoload_does_not_load() {
        // Kernels ≥ 6.15 request the module only for real hardware offload:
        // the SA is accepted, the module stays out.
        let mut f = Fake {
            modprobe_loads: true,
            ..Fake::default()
        };
        let r = ensure(&mut f, &[AddressFamily::V6]);
        assert_eq!(
            f.calls,
            [
                "loaded V6",
                "autoload V6",
                "loaded V6",
                "modprobe V6",
                "loaded V6"
            ]
        );
        assert_eq!(r.families[0].state, OffloadState::Modprobed);
        assert_eq!(warning(&r), None);
    }

    #[test]
    fn modprobe_after_a_refused_offload_sa() {
        let mut f = Fake {
            autoload_error: Some("EINVAL".into()),
            modprobe_loads: true,
            ..Fake::default()
        };
        let r = ensure(&mut f, &[AddressFamily::V4]);
        assert_eq!(r.families[0].state, OffloadState::Modprobed);
        assert!(r.families[0].failures.is_empty());
    }

    #[test]
    fn absent_gives_one_warning_naming_modules_reasons_and_fix() {
        let mut f = Fake {
            loaded: [AddressFamily::V4].into_iter().collect(),
            modprobe_error: Some("exit status: 1 Operation not permitted".into()),
            ..Fake::default()
        };
        let r = ensure(&mut f, &BOTH);
        assert_eq!(r.families[0].state, OffloadState::Loaded);
        assert_eq!(r.families[1].state, OffloadState::Absent);
        assert_eq!(r.families[1].failures.len(), 2, "{:?}", r.families[1]);
        let w = warning(&r).expect("a warning");
        assert!(!w.contains('\n'));
        assert!(w.contains("without GSO offload for IPv6"), "{w}");
        assert!(!w.contains("IPv4"), "{w}");
        assert!(w.contains("modprobe esp6_offload"), "{w}");
        assert!(w.contains("Operation not permitted"), "{w}");
        assert!(w.contains("did not load"), "{w}");
        assert!(w.contains("/etc/modules-load.d/"), "{w}");
        assert_eq!(
            serde_json::to_string(&r.by_key()).unwrap(),
            r#"{"v4":"loaded","v6":"absent"}"#
        );
    }

    #[test]
    fn both_absent_one_line_for_both() {
        let mut f = Fake {
            autoload_error: Some("EPERM".into()),
            modprobe_error: Some("not found".into()),
            ..Fake::default()
        };
        let r = ensure(&mut f, &BOTH);
        let w = warning(&r).unwrap();
        assert!(w.contains("IPv4 and IPv6"), "{w}");
        assert!(w.contains("`modprobe esp4_offload esp6_offload`"), "{w}");
        // A modprobe that "succeeds" without loading anything is absent too.
        let mut f = Fake::default();
        let r = ensure(&mut f, &[AddressFamily::V4]);
        assert_eq!(r.families[0].state, OffloadState::Absent);
        assert!(warning(&r).unwrap().contains("not listed in /sys/module"));
    }

    #[test]
    fn sys_modules_sees_loaded_and_builtin() {
        let d = std::env::temp_dir().join(format!("meshsec-offload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("module/esp4_offload")).unwrap();
        std::fs::write(
            d.join("modules.builtin"),
            "kernel/net/ipv6/esp6_offload.ko\nkernel/net/ipv4/esp4.ko\n",
        )
        .unwrap();
        let s = SysModules {
            sys_module: d.join("module"),
            builtin_list: d.join("modules.builtin"),
        };
        assert!(s.loaded("esp4_offload"));
        assert!(s.loaded("esp6_offload"));
        assert!(s.loaded("esp4"), "listed as built in");
        assert!(!s.loaded("esp"), "a prefix of a built-in name is not it");
        assert!(!s.loaded("xfrm_interface"));
        let none = SysModules {
            sys_module: d.join("missing"),
            builtin_list: d.join("missing.builtin"),
        };
        assert!(!none.loaded("esp4_offload"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
