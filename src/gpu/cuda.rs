//! The thin layer over the CUDA driver API (cudarc's raw `sys` bindings,
//! loaded at run time): device discovery, the primary context, streams,
//! device and pinned allocations, host registration, and the 1D/2D/3D
//! copies a [`Dma`] describes.
//!
//! Raw bindings rather than cudarc's safe wrappers because the hot path
//! wants exactly one driver call per DMA (the safe wrappers record events
//! around every operation) and because host registration of foreign
//! mappings (the zero-copy path) has no safe wrapper.
//!
//! Every owner here frees its resource on drop after making its context
//! current, so values can be dropped from any thread.

use std::ffi::{CStr, c_void};
use std::sync::Arc;

use cudarc::driver::sys;

use super::GpuError;
use super::layout::Dma;

fn check(call: &'static str, r: sys::CUresult) -> Result<(), GpuError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string or fails.
    let ok = unsafe { sys::cuGetErrorName(r, &mut name) } == sys::CUresult::CUDA_SUCCESS;
    let code = if ok && !name.is_null() {
        // SAFETY: the driver returns a NUL-terminated static string.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    } else {
        format!("{r:?}")
    };
    Err(GpuError::Cuda { call, code })
}

/// Loads the driver library and initialises it. Every other function here
/// needs this to have succeeded first: cudarc panics on a missing library.
pub fn init() -> Result<(), GpuError> {
    // SAFETY: probing for the library has no preconditions.
    if !unsafe { sys::is_culib_present() } {
        return Err(GpuError::NoGpu(
            "the CUDA driver library (libcuda.so) was not found".into(),
        ));
    }
    // SAFETY: the library is present; cuInit may be called any number of times.
    let r = unsafe { sys::cuInit(0) };
    if r != sys::CUresult::CUDA_SUCCESS {
        let detail = check("cuInit", r).err().map(|e| e.to_string());
        return Err(GpuError::NoGpu(detail.unwrap_or_default()));
    }
    Ok(())
}

/// The driver's CUDA version, e.g. 13000 for 13.0.
pub fn driver_version() -> Result<i32, GpuError> {
    let mut v = 0;
    // SAFETY: init() succeeded; v is a valid out pointer.
    check("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&mut v)
    })?;
    Ok(v)
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub ordinal: i32,
    pub name: String,
    pub total_memory: u64,
    pub compute_capability: (i32, i32),
    pub pci_bus_id: i32,
}

pub fn devices() -> Result<Vec<DeviceInfo>, GpuError> {
    let mut n = 0;
    // SAFETY: init() succeeded; n is a valid out pointer.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    let mut out = Vec::new();
    for ordinal in 0..n {
        let mut dev = 0;
        // SAFETY: ordinal < count.
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut dev, ordinal)
        })?;
        let mut name = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer holds 256 bytes and the driver NUL-terminates.
        check("cuDeviceGetName", unsafe {
            sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev)
        })?;
        // SAFETY: NUL-terminated by the driver.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut mem = 0usize;
        // SAFETY: valid device and out pointer.
        check("cuDeviceTotalMem", unsafe {
            sys::cuDeviceTotalMem_v2(&mut mem, dev)
        })?;
        let attr = |a: sys::CUdevice_attribute| -> Result<i32, GpuError> {
            let mut v = 0;
            // SAFETY: valid device and out pointer.
            check("cuDeviceGetAttribute", unsafe {
                sys::cuDeviceGetAttribute(&mut v, a, dev)
            })?;
            Ok(v)
        };
        use sys::CUdevice_attribute::*;
        out.push(DeviceInfo {
            ordinal,
            name,
            total_memory: mem as u64,
            compute_capability: (
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            pci_bus_id: attr(CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
        });
    }
    Ok(out)
}

/// A device's primary context (the one the runtime API and every framework
/// share), retained for the lifetime of this value.
pub struct Context {
    ctx: sys::CUcontext,
    dev: sys::CUdevice,
}

// SAFETY: a CUcontext handle may be used from any thread once made current
// there, which every user of it here does through bind().
unsafe impl Send for Context {}
// SAFETY: as above; the handle itself is never mutated.
unsafe impl Sync for Context {}

impl Context {
    pub fn new(ordinal: i32) -> Result<Arc<Context>, GpuError> {
        init()?;
        let mut dev = 0;
        // SAFETY: init() succeeded.
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut dev, ordinal)
        })?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: valid device and out pointer.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
        })?;
        let c = Arc::new(Context { ctx, dev });
        c.bind()?;
        Ok(c)
    }

    /// Makes this context current on the calling thread.
    pub fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: ctx is a retained primary context.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }

    pub fn mem_info(&self) -> Result<(u64, u64), GpuError> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: context current; valid out pointers.
        check("cuMemGetInfo", unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok((free as u64, total as u64))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: balances the retain in new().
        let r = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
        if let Err(e) = check("cuDevicePrimaryCtxRelease", r) {
            tracing::warn!(error = %e, "releasing the CUDA context failed");
        }
    }
}

/// A non-blocking stream (no implicit sync with the legacy default stream,
/// so threads' copies overlap).
pub struct Stream {
    ctx: Arc<Context>,
    raw: sys::CUstream,
}

// SAFETY: streams may be used from any thread with the context current.
unsafe impl Send for Stream {}

impl Stream {
    pub fn new(ctx: &Arc<Context>) -> Result<Stream, GpuError> {
        ctx.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: context current; valid out pointer.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        Ok(Stream {
            ctx: ctx.clone(),
            raw,
        })
    }

    pub fn sync(&self) -> Result<(), GpuError> {
        // SAFETY: raw is a live stream.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.raw)
        })
    }

    /// Fills `len` bytes at `dev` with `byte`.
    pub fn memset(&self, dev: u64, byte: u8, len: u64) -> Result<(), GpuError> {
        // SAFETY: the caller passes a range inside one of its allocations.
        check("cuMemsetD8Async", unsafe {
            sys::cuMemsetD8Async(dev, byte, len as usize, self.raw)
        })
    }

    /// Device to host, one contiguous range.
    ///
    /// # Safety
    /// `host` must be valid for `len` bytes until the stream is synchronised,
    /// and `dev .. dev + len` inside a live device allocation.
    pub unsafe fn dtoh(&self, host: *mut u8, dev: u64, len: u64) -> Result<(), GpuError> {
        // SAFETY: as the caller promised.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(host.cast(), dev, len as usize, self.raw)
        })
    }

    /// Host to device, one contiguous range.
    ///
    /// # Safety
    /// As for [`Stream::dtoh`].
    pub unsafe fn htod(&self, dev: u64, host: *const u8, len: u64) -> Result<(), GpuError> {
        // SAFETY: as the caller promised.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dev, host.cast(), len as usize, self.raw)
        })
    }

    /// Runs one planned DMA between the cache and a file-block buffer at
    /// `buf` (host memory, or device memory for the GDS path).
    ///
    /// # Safety
    /// `buf` must be valid for the plan's file block until the stream is
    /// synchronised, and the plan's device ranges inside live allocations.
    pub unsafe fn dma(&self, d: &Dma, buf: Buf, dir: Dir) -> Result<(), GpuError> {
        if d.height == 1 && d.depth == 1 {
            // SAFETY: in bounds as the caller promised.
            return unsafe {
                match (dir, buf) {
                    (Dir::ToBuf, Buf::Host(h)) => {
                        self.dtoh(h.add(d.buf_off as usize), d.dev, d.width)
                    }
                    (Dir::ToDevice, Buf::Host(h)) => {
                        self.htod(d.dev, h.add(d.buf_off as usize), d.width)
                    }
                    (Dir::ToBuf, Buf::Device(p)) => check(
                        "cuMemcpyDtoDAsync",
                        sys::cuMemcpyDtoDAsync_v2(p + d.buf_off, d.dev, d.width as usize, self.raw),
                    ),
                    (Dir::ToDevice, Buf::Device(p)) => check(
                        "cuMemcpyDtoDAsync",
                        sys::cuMemcpyDtoDAsync_v2(d.dev, p + d.buf_off, d.width as usize, self.raw),
                    ),
                }
            };
        }
        let host_type = sys::CUmemorytype::CU_MEMORYTYPE_HOST;
        let dev_type = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
        // The buffer side: host pointer or device address.
        let (buf_type, buf_host, buf_dev) = match buf {
            // SAFETY: in bounds as the caller promised.
            Buf::Host(h) => (host_type, unsafe { h.add(d.buf_off as usize) }, 0),
            Buf::Device(p) => (dev_type, std::ptr::null_mut(), p + d.buf_off),
        };
        // (type, host pointer, device address, pitch, rows per slice) of
        // source and destination.
        let dev_end = (
            dev_type,
            std::ptr::null_mut::<u8>(),
            d.dev,
            d.dev_pitch,
            d.dev_rows,
        );
        let buf_end = (buf_type, buf_host, buf_dev, d.buf_pitch, d.buf_rows);
        let (src, dst) = match dir {
            Dir::ToBuf => (dev_end, buf_end),
            Dir::ToDevice => (buf_end, dev_end),
        };
        if d.depth == 1 {
            let q = sys::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: src.0,
                srcHost: src.1.cast_const().cast(),
                srcDevice: src.2,
                srcArray: std::ptr::null_mut(),
                srcPitch: src.3 as usize,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: dst.0,
                dstHost: dst.1.cast(),
                dstDevice: dst.2,
                dstArray: std::ptr::null_mut(),
                dstPitch: dst.3 as usize,
                WidthInBytes: d.width as usize,
                Height: d.height as usize,
            };
            // SAFETY: in bounds as the caller promised.
            return check("cuMemcpy2DAsync", unsafe {
                sys::cuMemcpy2DAsync_v2(&q, self.raw)
            });
        }
        let p = sys::CUDA_MEMCPY3D {
            srcXInBytes: 0,
            srcY: 0,
            srcZ: 0,
            srcLOD: 0,
            srcMemoryType: src.0,
            srcHost: src.1.cast_const().cast(),
            srcDevice: src.2,
            srcArray: std::ptr::null_mut(),
            reserved0: std::ptr::null_mut(),
            srcPitch: src.3 as usize,
            srcHeight: src.4 as usize,
            dstXInBytes: 0,
            dstY: 0,
            dstZ: 0,
            dstLOD: 0,
            dstMemoryType: dst.0,
            dstHost: dst.1.cast(),
            dstDevice: dst.2,
            dstArray: std::ptr::null_mut(),
            reserved1: std::ptr::null_mut(),
            dstPitch: dst.3 as usize,
            dstHeight: dst.4 as usize,
            WidthInBytes: d.width as usize,
            Height: d.height as usize,
            Depth: d.depth as usize,
        };
        // SAFETY: in bounds as the caller promised.
        check("cuMemcpy3DAsync", unsafe {
            sys::cuMemcpy3DAsync_v2(&p, self.raw)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: raw is a live stream, destroyed once.
            let _ = unsafe { sys::cuStreamDestroy_v2(self.raw) };
        }
    }
}

/// Which side a [`Stream::dma`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Cache to file-block buffer (store).
    ToBuf,
    /// File-block buffer to cache (load).
    ToDevice,
}

/// Where a file-block buffer lives.
#[derive(Clone, Copy, Debug)]
pub enum Buf {
    Host(*mut u8),
    Device(u64),
}

/// A device allocation.
pub struct DeviceMem {
    ctx: Arc<Context>,
    ptr: u64,
    len: u64,
}

impl DeviceMem {
    pub fn new(ctx: &Arc<Context>, len: u64) -> Result<DeviceMem, GpuError> {
        ctx.bind()?;
        let mut ptr = 0;
        // SAFETY: context current; valid out pointer.
        check("cuMemAlloc", unsafe {
            sys::cuMemAlloc_v2(&mut ptr, len as usize)
        })?;
        Ok(DeviceMem {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: allocated by cuMemAlloc, freed once.
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

/// Page-locked host memory from the driver (page-aligned, so also usable
/// for O_DIRECT).
pub struct PinnedMem {
    ctx: Arc<Context>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: uniquely owned memory, like a Box<[u8]>.
unsafe impl Send for PinnedMem {}
// SAFETY: shared access only reads.
unsafe impl Sync for PinnedMem {}

impl PinnedMem {
    pub fn new(ctx: &Arc<Context>, len: usize) -> Result<PinnedMem, GpuError> {
        ctx.bind()?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: context current; valid out pointer. PORTABLE: usable from
        // every context, which costs nothing and spares surprises.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut ptr, len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE)
        })?;
        Ok(PinnedMem {
            ctx: ctx.clone(),
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedMem {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc, freed once.
            let _ = unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
        }
    }
}

/// Memory the caller mapped (a shared-memory file), page-locked and made
/// visible to the GPU for as long as this value lives.
pub struct Registered {
    ctx: Arc<Context>,
    ptr: *mut c_void,
}

// SAFETY: the registration is a driver-side handle keyed by address; it
// is only read after creation, and dropped once.
unsafe impl Send for Registered {}
// SAFETY: as above: shared access never mutates it.
unsafe impl Sync for Registered {}

impl Registered {
    /// # Safety
    /// `ptr .. ptr + len` must be a live mapping that outlives this value.
    pub unsafe fn new(
        ctx: &Arc<Context>,
        ptr: *mut c_void,
        len: usize,
        read_only: bool,
    ) -> Result<Registered, GpuError> {
        ctx.bind()?;
        let flags = if read_only {
            sys::CU_MEMHOSTREGISTER_READ_ONLY
        } else {
            0
        };
        // SAFETY: as the caller promised.
        let r = unsafe { sys::cuMemHostRegister_v2(ptr, len, flags) };
        if read_only && r == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED {
            // Drivers or platforms without read-only registration: a plain
            // one works on a read-only mapping for host-to-device copies.
            // SAFETY: as above.
            check("cuMemHostRegister", unsafe {
                sys::cuMemHostRegister_v2(ptr, len, 0)
            })?;
        } else {
            check("cuMemHostRegister", r)?;
        }
        Ok(Registered {
            ctx: ctx.clone(),
            ptr,
        })
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: registered in new(), unregistered once.
            let r = unsafe { sys::cuMemHostUnregister(self.ptr) };
            if let Err(e) = check("cuMemHostUnregister", r) {
                tracing::warn!(error = %e, "unregistering host memory failed");
            }
        }
    }
}
