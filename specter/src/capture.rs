//! The passive capture source: TC eBPF programs on an interface, and the ring they fill.
//!
//! [`Attachment::attach`] loads the object built from `specter-ebpf`, tells it the live ports
//! and attaches its classifiers to the interface: with TCX links on kernels that have them
//! (6.6 and later), otherwise with netlink filters on a `clsact` qdisc. Dropping the attachment
//! detaches everything Specter created. [`ring::run`] reads the ring and turns its records into
//! segments for reassembly.
//!
//! Minimum kernel: 5.8 (BPF ring buffer); TCX needs 6.6.

mod decode;
pub mod ring;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{Program, SchedClassifier, TcAttachType, tc},
    util::KernelVersion,
};
use serde::Serialize;
use specter_common::{Endpoint, counter, maps, programs};
use thiserror::Error;
use tracing::{debug, info, warn};

/// The eBPF object built from `specter-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/specter"));

/// Why passive capture could not start. Each names the cause an operator can act on.
#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("interface {iface} does not exist")]
    NoInterface { iface: String },
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("the kernel rejected eBPF program {program}: {source}")]
    Verifier {
        program: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF program {program} is not a TC classifier")]
    UnexpectedProgram { program: String },
    #[error("eBPF map {map} is missing from the object or has the wrong type: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("cannot attach {program} to {iface} ({direction}): {source}")]
    Attach {
        program: &'static str,
        iface: String,
        direction: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot add the clsact qdisc to {iface}: {reason}")]
    Qdisc { iface: String, reason: String },
    #[error("capture.ring_bytes is {0}; it must be a power of two of at least 4096")]
    RingSize(u32),
}

/// What to attach to.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub iface: String,
    /// The live service's ports.
    pub ports: Vec<u16>,
    /// Size of the BPF ring buffer.
    pub ring_bytes: u32,
}

/// How the classifiers were attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX links (kernel 6.6+): released by the kernel if Specter dies.
    Tcx,
    /// Netlink filters on a clsact qdisc (older kernels).
    Netlink,
}

/// Counters the kernel programs keep, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KernelCounters {
    pub packets_seen: u64,
    pub packets_copied: u64,
    pub bytes_copied: u64,
    pub ring_drops: u64,
    pub truncated: u64,
    pub own_traffic: u64,
    pub fragments: u64,
}

/// The eBPF programs attached to one interface. Dropping it detaches them.
pub struct Attachment {
    ebpf: Ebpf,
    iface: String,
    mode: AttachMode,
    /// Set when Specter added the clsact qdisc and must remove it again.
    owned_qdisc: Option<PathBuf>,
}

/// Everything a successful attach hands back.
pub struct Capture {
    pub attachment: Attachment,
    pub exclusions: Exclusions,
    pub ring: ring::Ring,
    pub counters: CounterReader,
}

/// Reads the kernel programs' per-CPU counters.
pub struct CounterReader {
    map: PerCpuArray<MapData, u64>,
}

impl CounterReader {
    /// The counters, summed over CPUs.
    pub fn read(&self) -> KernelCounters {
        let read = |index: u32| -> u64 {
            self.map
                .get(&index, 0)
                .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
                .unwrap_or(0)
        };
        KernelCounters {
            packets_seen: read(counter::PACKETS_SEEN),
            packets_copied: read(counter::PACKETS_COPIED),
            bytes_copied: read(counter::BYTES_COPIED),
            ring_drops: read(counter::RING_DROPS),
            truncated: read(counter::TRUNCATED),
            own_traffic: read(counter::OWN_TRAFFIC),
            fragments: read(counter::FRAGMENTS),
        }
    }
}

/// The local endpoints of Specter's own connections, which the classifiers skip.
pub struct Exclusions {
    map: Mutex<BpfHashMap<MapData, Endpoint, u8>>,
}

impl Exclusions {
    /// Stops capturing packets to and from `local` (one of Specter's own sockets).
    pub fn add(&self, local: SocketAddr) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = map.insert(endpoint(local), 1, 0) {
            warn!(%local, %error, "Cannot exclude Specter's own connection from capture");
        }
    }

    /// Forgets an endpoint once its connection is closed.
    pub fn remove(&self, local: SocketAddr) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let _ = map.remove(&endpoint(local));
    }
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    let mut bytes = [0u8; 16];
    match addr.ip() {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => bytes[..4].copy_from_slice(&v4.octets()),
            None => bytes = v6.octets(),
        },
    }
    Endpoint {
        addr: bytes,
        port: addr.port(),
        _pad: [0; 2],
    }
}

/// Loads the object and every program in it through the verifier, without attaching; returns
/// the object and the names of the programs loaded.
pub fn load_all() -> Result<(Ebpf, Vec<String>), CaptureError> {
    let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|e| CaptureError::Object(Box::new(e)))?;
    let loaded = load_programs(&mut ebpf)?;
    Ok((ebpf, loaded))
}

fn load_programs(ebpf: &mut Ebpf) -> Result<Vec<String>, CaptureError> {
    let mut loaded = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        match program {
            Program::SchedClassifier(classifier) => {
                classifier.load().map_err(|source| CaptureError::Verifier {
                    program: name.to_owned(),
                    source: Box::new(source),
                })?;
                loaded.push(name.to_owned());
            }
            _ => {
                return Err(CaptureError::UnexpectedProgram {
                    program: name.to_owned(),
                });
            }
        }
    }
    loaded.sort();
    Ok(loaded)
}

impl Attachment {
    /// Loads the programs, sets the live ports and attaches to the interface.
    pub fn attach(settings: &CaptureSettings) -> Result<Capture, CaptureError> {
        let iface = settings.iface.clone();
        if !PathBuf::from("/sys/class/net").join(&iface).exists() {
            return Err(CaptureError::NoInterface { iface });
        }
        let ring_bytes = settings.ring_bytes;
        if ring_bytes < 4096 || !ring_bytes.is_power_of_two() {
            return Err(CaptureError::RingSize(ring_bytes));
        }
        raise_memlock_limit();

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::SEGMENTS, ring_bytes)
            .load(EBPF_OBJECT)
            .map_err(|e| CaptureError::Object(Box::new(e)))?;
        load_programs(&mut ebpf)?;

        let mut ports: BpfHashMap<MapData, u16, u8> = take_map(&mut ebpf, maps::PORTS)?;
        for port in &settings.ports {
            ports.insert(port, 1, 0).map_err(|e| CaptureError::Map {
                map: maps::PORTS,
                reason: e.to_string(),
            })?;
        }
        let exclusions = Exclusions {
            map: Mutex::new(take_map(&mut ebpf, maps::EXCLUDE)?),
        };
        let counters = CounterReader {
            map: take_map(&mut ebpf, maps::COUNTERS)?,
        };
        let ring = ring::Ring::new(take_map(&mut ebpf, maps::SEGMENTS)?, settings.ports.clone())?;

        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let mode = if tcx {
            AttachMode::Tcx
        } else {
            AttachMode::Netlink
        };
        let mut attachment = Attachment {
            ebpf,
            iface,
            mode,
            owned_qdisc: None,
        };
        if mode == AttachMode::Netlink {
            attachment.prepare_netlink()?;
        }

        // On loopback every packet leaves and arrives on the same interface; one hook sees it
        // once.
        let loopback = is_loopback(&attachment.iface);
        let hooks: &[(&'static str, TcAttachType, &'static str)] = if loopback {
            &[(programs::EGRESS, TcAttachType::Egress, "egress")]
        } else {
            &[
                (programs::INGRESS, TcAttachType::Ingress, "ingress"),
                (programs::EGRESS, TcAttachType::Egress, "egress"),
            ]
        };
        for &(name, attach_type, direction) in hooks {
            let program: &mut SchedClassifier = attachment
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(CaptureError::UnexpectedProgram {
                    program: name.to_owned(),
                })?;
            program
                .attach(&attachment.iface, attach_type)
                .map_err(|source| CaptureError::Attach {
                    program: name,
                    iface: attachment.iface.clone(),
                    direction,
                    source: Box::new(source),
                })?;
        }

        info!(
            iface = %attachment.iface,
            ports = ?settings.ports,
            mode = ?attachment.mode,
            ring_bytes,
            "Attached capture programs"
        );
        Ok(Capture {
            attachment,
            exclusions,
            ring,
            counters,
        })
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Netlink filters outlive the process; remove any a crashed Specter left, and add the
    /// clsact qdisc if the interface has none, remembering that it is ours to remove.
    fn prepare_netlink(&mut self) -> Result<(), CaptureError> {
        for (name, attach_type) in [
            (programs::INGRESS, TcAttachType::Ingress),
            (programs::EGRESS, TcAttachType::Egress),
        ] {
            match tc::qdisc_detach_program(&self.iface, attach_type, name) {
                Ok(()) => {
                    info!(iface = %self.iface, program = name, "Removed a filter left by an earlier run")
                }
                Err(error) => debug!(%error, program = name, "No earlier filter to remove"),
            }
        }

        let marker = qdisc_marker(&self.iface);
        match tc::qdisc_add_clsact(&self.iface) {
            Ok(()) => {
                if let Some(dir) = marker.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let _ = std::fs::write(&marker, b"clsact qdisc added by specter\n");
                self.owned_qdisc = Some(marker);
            }
            // EEXIST: the interface already has a clsact qdisc. If an earlier Specter added it
            // (its marker is still there), it remains ours to remove.
            Err(tc::TcError::NetlinkError(error)) if error.raw_os_error() == Some(libc::EEXIST) => {
                if marker.exists() {
                    self.owned_qdisc = Some(marker);
                }
            }
            Err(error) => {
                return Err(CaptureError::Qdisc {
                    iface: self.iface.clone(),
                    reason: error.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Links and filters go with the programs when `ebpf` is dropped; the qdisc does not.
        if let Some(marker) = self.owned_qdisc.take() {
            // The filters must be gone before the qdisc is removed; detach them explicitly.
            for (name, attach_type) in [
                (programs::INGRESS, TcAttachType::Ingress),
                (programs::EGRESS, TcAttachType::Egress),
            ] {
                let _ = tc::qdisc_detach_program(&self.iface, attach_type, name);
            }
            let status = std::process::Command::new("tc")
                .args(["qdisc", "del", "dev", &self.iface, "clsact"])
                .status();
            match status {
                Ok(s) if s.success() => {
                    let _ = std::fs::remove_file(marker);
                }
                _ => warn!(
                    iface = %self.iface,
                    "Cannot remove the clsact qdisc Specter added; remove it with \
                     `tc qdisc del dev {} clsact`",
                    self.iface
                ),
            }
        }
        info!(iface = %self.iface, "Detached capture programs");
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Map {
        map: name,
        reason: "not in the object".into(),
    })?;
    T::try_from(map).map_err(|e| CaptureError::Map {
        map: name,
        reason: e.to_string(),
    })
}

fn is_loopback(iface: &str) -> bool {
    // IFF_LOOPBACK, from the interface flags the kernel publishes.
    std::fs::read_to_string(format!("/sys/class/net/{iface}/flags"))
        .ok()
        .and_then(|text| u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|flags| flags & libc::IFF_LOOPBACK as u32 != 0)
}

fn qdisc_marker(iface: &str) -> PathBuf {
    PathBuf::from("/run/specter").join(format!("{iface}.clsact"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so a large ring loads.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to a local struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret != 0 {
        debug!("Cannot raise RLIMIT_MEMLOCK; fine on kernels with memcg accounting");
    }
}
