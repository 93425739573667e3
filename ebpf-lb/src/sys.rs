//! The two pieces of kernel plumbing aya does not wrap: mounting bpffs, and
//! waiting for every running BPF program to finish (an RCU grace period).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use crate::{Error, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mount bpffs at `mount_point` unless it is already there. Two loaders
/// starting at once (two agents, or tests in parallel) must not both mount:
/// the second mount would hide the first one's pins. So the check and the
/// mount happen under an exclusive lock on the mount point's directory.
pub fn ensure_bpffs(mount_point: &Path) -> Result<()> {
    std::fs::create_dir_all(mount_point)
        .map_err(|e| Error::io("creating bpffs mount point", mount_point, e))?;
    if is_bpffs(mount_point)? {
        return Ok(());
    }
    let dir = std::fs::File::open(mount_point)
        .map_err(|e| Error::io("opening the bpffs mount point", mount_point, e))?;
    // SAFETY: flock on a descriptor we own; released when `dir` is closed.
    while unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(Error::io("locking the bpffs mount point", mount_point, e));
        }
    }
    // Another loader may have mounted it while this one waited.
    if is_bpffs(mount_point)? {
        return Ok(());
    }
    let target = cstring(mount_point)?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "mounting bpffs (needs CAP_SYS_ADMIN) at",
            mount_point,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// One loader's hold on an instance's pin folder. Two loaders on one
/// instance (two agents with the same `--lb-instance`, or one started while
/// the old one still runs) would each rebuild their bookkeeping from the
/// maps and then undo each other's batches. The hold is an exclusive `flock`
/// on the folder: it goes when the loader is dropped, or when its process
/// ends in any way (a crashed agent leaves no stale lock behind).
#[derive(Debug)]
pub(crate) struct PinLock(
    // Held for its descriptor: closing it releases the lock.
    #[allow(dead_code)] std::fs::File,
);

pub(crate) fn lock_pin_dir(dir: &Path) -> Result<PinLock> {
    let file = std::fs::File::open(dir).map_err(|e| Error::io("opening the pin folder", dir, e))?;
    loop {
        // SAFETY: flock on a descriptor we own; released when it is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(PinLock(file));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(Error::InUse {
                    dir: dir.to_path_buf(),
                    holder: lock_holder(&file),
                });
            }
            _ => return Err(Error::io("locking the pin folder", dir, e)),
        }
    }
}

/// "pid N (command)" of the process holding an `flock` on `file`, read from
/// `/proc/locks` (lines like `1: FLOCK  ADVISORY  WRITE 4242 00:1f:5830 0
/// EOF`). `None` when it cannot be told (another PID namespace).
fn lock_holder(file: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse::<u32>().ok())
            .flatten()
    })?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    Some(match comm.trim() {
        "" => format!("pid {pid}"),
        c => format!("pid {pid} ({c})"),
    })
}

pub(crate) fn is_bpffs(path: &Path) -> Result<bool> {
    let p = cstring(path)?;
    // SAFETY: statfs fills the zeroed struct; p is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(p.as_ptr(), &mut st) } != 0 {
        return Err(Error::io("statfs", path, io::Error::last_os_error()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::io(
            "path",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "contains NUL"),
        )
    })
}

/// Waits for an RCU grace period, after which no BPF program that started
/// before the call is still running.
///
/// The kernel calls `synchronize_rcu()` on every update of a map-of-maps made
/// from user space (`maybe_wait_bpf_programs`), precisely so that user space
/// knows no program still uses the previous value. Updating a private
/// one-slot array-of-maps is the cheapest way to ask for that.
pub(crate) struct RcuBarrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    // The rest of the kernel's union bpf_attr, zeroed.
    _rest: [u64; 14],
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: attr points to a live, properly sized bpf_attr prefix.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl RcuBarrier {
    pub(crate) fn new() -> Result<Self> {
        let inner = create_map(BPF_MAP_TYPE_ARRAY, None)?;
        let outer = create_map(BPF_MAP_TYPE_ARRAY_OF_MAPS, Some(&inner))?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program running at the time of the call has finished.
    pub(crate) fn wait(&self) -> Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        let mut attr = MapElemAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: (&raw const key) as u64,
            value: (&raw const value) as u64,
            flags: 0,
        };
        bpf(
            BPF_MAP_UPDATE_ELEM,
            (&raw mut attr).cast(),
            size_of::<MapElemAttr>(),
        )
        .map_err(|source| Error::Syscall {
            call: "BPF_MAP_UPDATE_ELEM (rcu barrier)",
            source,
        })?;
        Ok(())
    }
}

/// A one-slot map with 4-byte keys and values.
fn create_map(map_type: u32, inner: Option<&OwnedFd>) -> Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        inner_map_fd: inner.map_or(0, |fd| fd.as_raw_fd() as u32),
        ..Default::default()
    };
    let fd = bpf(
        BPF_MAP_CREATE,
        (&raw mut attr).cast(),
        size_of::<MapCreateAttr>(),
    )
    .map_err(|source| Error::Syscall {
        call: "BPF_MAP_CREATE (rcu barrier)",
        source,
    })?;
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
    _pad: [u32; 15],
}

/// Detaches the link pinned at `pin` and removes the pin.
///
/// Removing a pin alone drops the last reference only after an RCU grace
/// period and a work item, so the program would keep running for a moment;
/// `BPF_LINK_DETACH` takes it off its hook before this returns.
pub(crate) fn detach_pinned_link(pin: &Path) -> Result<()> {
    let path = cstring(pin)?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_OBJ_GET, (&raw mut get).cast(), size_of::<ObjGetAttr>()) {
        Ok(fd) => {
            // SAFETY: BPF_OBJ_GET returned a new descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let mut detach = LinkDetachAttr {
                link_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            // A link whose target is gone (a deleted veth) is already detached.
            if let Err(e) = bpf(
                BPF_LINK_DETACH,
                (&raw mut detach).cast(),
                size_of::<LinkDetachAttr>(),
            ) && e.raw_os_error() != Some(libc::ENOLINK)
                && e.raw_os_error() != Some(libc::EINVAL)
            {
                return Err(Error::io("detaching pinned link", pin, e));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("opening pinned link", pin, e)),
    }
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing pinned link", pin, e)),
    }
}
