use std::{io, path::PathBuf};

use crate::Frontend;

/// Everything the load balancer can refuse or fail at. Each variant names the
/// object involved and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "loading the kernel programs failed: {source}\n\
         (needs root or CAP_BPF+CAP_NET_ADMIN, and Linux 5.18 or newer with cgroup v2 and BTF)"
    )]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },

    #[error("kernel program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error("map {map}: updating {what}: {source}")]
    MapUpdate {
        map: &'static str,
        what: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error(
        "map {map} is full ({capacity} entries) while updating {what}; the previous state is \
         unchanged. {}",
        raise_limit(option)
    )]
    MapFull {
        map: &'static str,
        capacity: u32,
        option: &'static str,
        what: String,
    },

    #[error(
        "another loader ({}) holds the load balancer instance at {dir}: stop it first, or give \
         this one an instance of its own (the agent's --lb-instance)",
        holder.as_deref().unwrap_or("its process is not visible here")
    )]
    InUse {
        dir: PathBuf,
        /// "pid N (command)" of the holder, when `/proc/locks` tells.
        holder: Option<String>,
    },

    #[error(
        "pinned map {map} under {dir} has {pinned} entries, but these settings size it at \
         {wanted} (ebpf-lb Options::{setting}): it was left by another version or other settings. \
         Remove the old state (`mesh-agent uninstall`, or LoadBalancer::uninstall_at; balancing \
         through it stops until the next start) and start again"
    )]
    PinnedSizeMismatch {
        map: &'static str,
        dir: PathBuf,
        pinned: u32,
        wanted: u32,
        /// The setting the size comes from (`max_sockets / 4`, say).
        setting: &'static str,
    },

    #[error(
        "pinned map {map} under {dir} holds {pinned_key}-byte keys and {pinned_value}-byte values \
         but this version of the programs uses {key} and {value}: it was left by another \
         version. Remove the old state (`mesh-agent uninstall`, or LoadBalancer::uninstall_at) \
         and start again"
    )]
    PinnedLayoutMismatch {
        map: &'static str,
        dir: PathBuf,
        pinned_key: u32,
        pinned_value: u32,
        key: u32,
        value: u32,
    },

    #[error("proxy address: {0}")]
    InvalidProxy(String),

    #[error("{0}")]
    Corrupt(String),

    #[error("service {frontend}: {reason}")]
    InvalidService { frontend: Frontend, reason: String },

    #[error("service {0} is not known to the load balancer")]
    UnknownService(Frontend),

    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },

    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn map(map: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            map,
            source: Box::new(source),
        }
    }

    /// A map update for one service that failed (and was rolled back).
    pub(crate) fn map_for(
        map: &'static str,
        what: &impl std::fmt::Display,
        source: aya::maps::MapError,
    ) -> Self {
        Self::MapUpdate {
            map,
            what: what.to_string(),
            source: Box::new(source),
        }
    }

    pub(crate) fn program(program: &'static str, source: aya::programs::ProgramError) -> Self {
        Self::Program {
            program,
            source: Box::new(source),
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// How to raise the limit `option` (an `Options` field) of a full map.
fn raise_limit(option: &str) -> String {
    // Connections keep using the old entries until no socket can read
    // them: the new ones are written beside them first.
    let why = match option {
        "max_backends" => {
            "An update holds a service's old and new backends at once, so one with more than \
             half the limit cannot change. "
        }
        "max_services" => {
            "A service whose frontends change needs a spare entry while its old ones retire. "
        }
        _ => "",
    };
    match option {
        "max_services" | "max_backends" => format!(
            "{why}Remove unused services, or raise the limit (the agent's --lb-{}, ebpf-lb \
             Options::{option}) and recreate the tables with `mesh-agent uninstall` before the \
             next start",
            option.replace('_', "-")
        ),
        _ => format!(
            "Raise ebpf-lb Options::{option} (the agent sets no other limit) and recreate the \
             tables with `mesh-agent uninstall` before the next start"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn a_full_map_names_the_agent_flag_that_sizes_it() {
        let e = Error::MapFull {
            map: "BACKENDS",
            capacity: 8,
            option: "max_backends",
            what: "service shop/cart".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("Options::max_backends")
                && text.contains("old and new backends at once")
                && text.contains("--lb-max-backends")
                && text.contains("mesh-agent uninstall"),
            "{text}"
        );
        // The enrolment table's limit is no agent flag: none is named.
        let text = Error::MapFull {
            map: "ENROLLED",
            capacity: 8,
            option: "max_enrolled",
            what: "cgroup 42".into(),
        }
        .to_string();
        assert!(
            text.contains("Options::max_enrolled") && !text.contains("--lb-"),
            "{text}"
        );
    }
}
