//! GPUDirect Storage reads through cuFile, with `libcufile.so.0` loaded at
//! run time (`dlopen`), so nothing links against it. Without the nvidia-fs
//! kernel module cuFile runs in compatibility mode (POSIX reads into its own
//! bounce buffers, then copies to the GPU); [`CuFile::mode`] reports which
//! mode is in force rather than assuming.

use std::ffi::{CStr, CString, c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::GpuError;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CuFileError {
    err: c_int,
    cu_err: c_int,
}

/// `CUfileDescr_t`: handle type, a union of fd / Windows handle, fs ops.
#[repr(C)]
struct CuFileDescr {
    type_: c_int,
    handle: *mut c_void,
    fs_ops: *const c_void,
}

const CU_FILE_HANDLE_TYPE_OPAQUE_FD: c_int = 1;

/// The leading, stable part of `CUfileDrvProps_t`; the struct is read into
/// a larger zeroed buffer because later CUDA versions append fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DrvPropsHead {
    nvfs_major: u32,
    nvfs_minor: u32,
    poll_thresh_size: usize,
    max_direct_io_size: usize,
    dstatusflags: u32,
    dcontrolflags: u32,
}

/// `CU_FILE_ALLOW_COMPAT_MODE` bit of `dcontrolflags`.
const CONTROL_ALLOW_COMPAT: u32 = 1 << 1;

type FnVoid = unsafe extern "C" fn() -> CuFileError;
type FnProps = unsafe extern "C" fn(*mut c_void) -> CuFileError;
type FnHandleRegister = unsafe extern "C" fn(*mut *mut c_void, *mut CuFileDescr) -> CuFileError;
type FnHandleDeregister = unsafe extern "C" fn(*mut c_void);
type FnBufRegister = unsafe extern "C" fn(*const c_void, usize, c_int) -> CuFileError;
type FnBufDeregister = unsafe extern "C" fn(*const c_void) -> CuFileError;
type FnRead =
    unsafe extern "C" fn(*mut c_void, *mut c_void, usize, libc::off_t, libc::off_t) -> isize;

/// The loaded library with the driver opened.
pub struct CuFile {
    lib: *mut c_void,
    close: FnVoid,
    props: FnProps,
    handle_register: FnHandleRegister,
    handle_deregister: FnHandleDeregister,
    buf_register: FnBufRegister,
    buf_deregister: FnBufDeregister,
    read: FnRead,
    pub loaded_from: String,
}

// SAFETY: cuFile's API is thread-safe; the handle is only read.
unsafe impl Send for CuFile {}
// SAFETY: as above.
unsafe impl Sync for CuFile {}

/// What [`CuFile::mode`] found out.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GdsMode {
    /// "gds" (nvidia-fs loaded and reported by cuFile) or "compat".
    pub mode: &'static str,
    pub nvidia_fs_module: bool,
    pub nvfs_version: Option<String>,
    pub allow_compat: Option<bool>,
    pub properties_error: Option<String>,
}

/// Names of the cuFile errors a caller can act on (cufile.h, `CUfileOpError`).
fn op_error(code: c_int) -> String {
    let name = match code {
        5001 => "driver not initialized",
        5008 => "I/O not supported",
        5018 => "invalid file type",
        5019 => "invalid file open flag",
        5020 => "O_DIRECT not set",
        5027 => {
            "file handle not registered: cuFile could not set up this file; its cufile.log says why"
        }
        5030 => "internal error",
        _ => "",
    };
    if name.is_empty() {
        format!("error {code}")
    } else {
        format!("error {code} ({name})")
    }
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a thread-local NUL-terminated string.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null NUL-terminated string.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Where to look for the library, first hit wins: an explicit path, the
/// loader's own search, then the toolkit directories `CUDA_HOME`/`CUDA_PATH`
/// and the conventional `/usr/local/cuda` name.
fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = explicit {
        v.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("KVFS_CUFILE_LIB") {
        v.push(PathBuf::from(p));
    }
    v.push(PathBuf::from("libcufile.so.0"));
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    for r in roots {
        v.push(r.join("lib64/libcufile.so.0"));
        v.push(r.join("targets/x86_64-linux/lib/libcufile.so.0"));
    }
    v
}

impl CuFile {
    /// Loads the library and opens the cuFile driver.
    pub fn load(explicit: Option<&Path>) -> Result<CuFile, GpuError> {
        let mut tried = Vec::new();
        for cand in candidates(explicit) {
            let Ok(c) = CString::new(cand.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: a NUL-terminated name; the handle is checked.
            let lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if lib.is_null() {
                tried.push(format!("{}: {}", cand.display(), dlerror()));
                continue;
            }
            return Self::from_lib(lib, cand.display().to_string());
        }
        Err(GpuError::Gds(format!(
            "libcufile.so.0 not found (set KVFS_CUFILE_LIB or --cufile-lib); tried {}",
            tried.join("; ")
        )))
    }

    fn from_lib(lib: *mut c_void, loaded_from: String) -> Result<CuFile, GpuError> {
        fn sym<T: Copy>(lib: *mut c_void, name: &CStr) -> Result<T, GpuError> {
            // SAFETY: lib is a live handle; name is NUL-terminated.
            let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
            if p.is_null() {
                return Err(GpuError::Gds(format!(
                    "symbol {} missing from libcufile",
                    name.to_string_lossy()
                )));
            }
            // SAFETY: T is the function pointer type of this symbol as
            // declared in cufile.h, and has the size of a pointer.
            Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
        }
        let open: FnVoid = sym(lib, c"cuFileDriverOpen")?;
        let f = CuFile {
            lib,
            close: sym(lib, c"cuFileDriverClose")?,
            props: sym(lib, c"cuFileDriverGetProperties")?,
            handle_register: sym(lib, c"cuFileHandleRegister")?,
            handle_deregister: sym(lib, c"cuFileHandleDeregister")?,
            buf_register: sym(lib, c"cuFileBufRegister")?,
            buf_deregister: sym(lib, c"cuFileBufDeregister")?,
            read: sym(lib, c"cuFileRead")?,
            loaded_from,
        };
        // SAFETY: resolved from the library with the documented signature.
        let e = unsafe { open() };
        if e.err != 0 {
            return Err(GpuError::Gds(format!(
                "cuFileDriverOpen failed: {} (CUDA {})",
                op_error(e.err),
                e.cu_err
            )));
        }
        Ok(f)
    }

    /// Which mode reads will run in, from the driver properties and the
    /// presence of the nvidia-fs module.
    pub fn mode(&self) -> GdsMode {
        let nvidia_fs_module = Path::new("/sys/module/nvidia_fs").exists()
            || Path::new("/proc/driver/nvidia-fs").exists();
        let mut buf = [0u64; 64];
        // SAFETY: the buffer is larger than any CUfileDrvProps_t so far.
        let e = unsafe { (self.props)(buf.as_mut_ptr().cast()) };
        let (head, properties_error) = if e.err == 0 {
            // SAFETY: the buffer starts with DrvPropsHead's layout and is aligned for it.
            (Some(unsafe { *buf.as_ptr().cast::<DrvPropsHead>() }), None)
        } else {
            (
                None,
                Some(format!("cuFile error {} (CUDA {})", e.err, e.cu_err)),
            )
        };
        let nvfs = head.filter(|h| h.nvfs_major > 0);
        GdsMode {
            mode: if nvidia_fs_module && nvfs.is_some() {
                "gds"
            } else {
                "compat"
            },
            nvidia_fs_module,
            nvfs_version: nvfs.map(|h| format!("{}.{}", h.nvfs_major, h.nvfs_minor)),
            allow_compat: head.map(|h| h.dcontrolflags & CONTROL_ALLOW_COMPAT != 0),
            properties_error,
        }
    }

    /// Registers a device buffer for cuFile's own DMA (optional: without it
    /// cuFile stages through its internal buffers).
    pub fn register_buffer(&self, dev: u64, len: usize) -> Result<(), GpuError> {
        // SAFETY: dev is a live device allocation of at least len bytes.
        let e = unsafe { (self.buf_register)(dev as *const c_void, len, 0) };
        if e.err != 0 {
            return Err(GpuError::Gds(format!(
                "cuFileBufRegister: {}",
                op_error(e.err)
            )));
        }
        Ok(())
    }

    pub fn deregister_buffer(&self, dev: u64) {
        // SAFETY: registered by register_buffer.
        let _ = unsafe { (self.buf_deregister)(dev as *const c_void) };
    }

    /// Reads the whole file at `path` (`len` bytes) into device memory at
    /// `dev`. A short read is an error.
    pub fn read_file(&self, path: &Path, dev: u64, len: usize) -> Result<(), GpuError> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| GpuError::Gds(format!("bad path {}", path.display())))?;
        // SAFETY: NUL-terminated path; the fd is owned below.
        let raw = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECT | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(GpuError::Io {
                op: "open",
                path: path.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: just opened, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut descr = CuFileDescr {
            type_: CU_FILE_HANDLE_TYPE_OPAQUE_FD,
            handle: std::ptr::null_mut(),
            fs_ops: std::ptr::null(),
        };
        // The union's fd member overlays the pointer's low bytes (little endian).
        descr.handle = fd.as_raw_fd() as usize as *mut c_void;
        let mut fh = std::ptr::null_mut();
        // SAFETY: descr describes a live fd; fh is an out pointer.
        let e = unsafe { (self.handle_register)(&mut fh, &mut descr) };
        if e.err != 0 {
            return Err(GpuError::Gds(format!(
                "cuFileHandleRegister {}: {} (CUDA {})",
                path.display(),
                op_error(e.err),
                e.cu_err
            )));
        }
        // SAFETY: registered handle; dev valid for len bytes.
        let n = unsafe { (self.read)(fh, dev as *mut c_void, len, 0, 0) };
        // SAFETY: registered above, deregistered once.
        unsafe { (self.handle_deregister)(fh) };
        drop(fd);
        if n < 0 {
            return Err(GpuError::Gds(format!(
                "cuFileRead {}: returned {n}",
                path.display()
            )));
        }
        if n as usize != len {
            return Err(GpuError::Short {
                op: "cuFileRead",
                path: path.to_path_buf(),
                expected: len as u64,
                got: n as u64,
            });
        }
        Ok(())
    }
}

impl Drop for CuFile {
    fn drop(&mut self) {
        // SAFETY: opened in from_lib. The library stays loaded: cuFile keeps
        // threads that would crash if its code were unmapped.
        let _ = unsafe { (self.close)() };
        let _ = self.lib;
    }
}

/// The directory under the NVMe tier that mirrors the mount's paths: a kvfs
/// NVMe directory keeps finished files under `data/`, so given the tier's
/// own directory this descends into it; any other directory is taken as is.
pub fn data_root(dir: &Path) -> PathBuf {
    if dir.join("lock").exists() && dir.join("data").is_dir() {
        dir.join("data")
    } else {
        dir.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_root_descends_into_a_tier_directory() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(data_root(d.path()), d.path());
        std::fs::create_dir(d.path().join("data")).expect("mkdir");
        assert_eq!(
            data_root(d.path()),
            d.path(),
            "no lock file: not a tier dir"
        );
        std::fs::write(d.path().join("lock"), b"").expect("lock");
        assert_eq!(data_root(d.path()), d.path().join("data"));
    }

    #[test]
    fn explicit_library_comes_first() {
        let c = candidates(Some(Path::new("/opt/x/libcufile.so.0")));
        assert_eq!(c[0], Path::new("/opt/x/libcufile.so.0"));
        assert!(c.iter().any(|p| p == Path::new("libcufile.so.0")));
    }
}
