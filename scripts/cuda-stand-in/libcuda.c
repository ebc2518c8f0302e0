// A stand-in for the NVIDIA driver (`libcuda.so.1`) that lets the `cuda` backend run on a machine
// without a GPU far enough to compile every kernel it launches, so the PTX can be checked before a
// GPU is at hand (scripts/cuda-ptx-check.sh).
//
// It answers as one H200 (compute capability 9.0) under a CUDA 13.0 driver. Device memory is host
// memory (a device pointer is a host address; copies are memcpy), so uploads, downloads and copies
// are real. Kernels are not: `cuModuleLoadData` writes each PTX module into $CUDA_STAND_IN_DIR and
// `cuLaunchKernel` notes each kernel's first launch in launched.log there and returns, leaving its
// outputs as they were (a launch the driver would refuse, empty or over the device's limits, is
// refused and noted in bad-launch.log). Every number a test reads back is therefore meaningless;
// what the run shows is which kernels were compiled.
//
// Build: cc -shared -fPIC -O1 -o libcuda.so.1 libcuda.c
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <pthread.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;
typedef void *CUcontext, *CUstream, *CUevent, *CUmodule, *CUfunction;

enum { OK = 0, ERR_INVALID_VALUE = 1, ERR_OUT_OF_MEMORY = 2, ERR_NOT_SUPPORTED = 801 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long modules;
static char handle_storage[1]; // the address every opaque handle points at

static void log_line(const char *kind, const char *text) {
  const char *dir = getenv("CUDA_STAND_IN_DIR");
  if (!dir) return;
  char path[4096];
  snprintf(path, sizeof path, "%s/%s.log", dir, kind);
  FILE *f = fopen(path, "a");
  if (f) { fprintf(f, "%s\n", text); fclose(f); }
}

// ---- driver, device, context ----
CUresult cuInit(unsigned flags) { (void)flags; return OK; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return OK; }
// The driver's private tables. NVRTC asks for one when a driver is loaded in its process, and
// without this symbol it crashed (NVRTC 13.0.88); it takes the refusal and compiles.
CUresult cuGetExportTable(const void **table, const void *id) { (void)id; *table = NULL; return ERR_NOT_SUPPORTED; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return OK; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
  if (ordinal != 0) return ERR_INVALID_VALUE;
  *d = 0;
  return OK;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
  (void)d;
  snprintf(name, (size_t)len, "NVIDIA H200");
  return OK;
}
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
  (void)d;
  *bytes = (size_t)143771 << 20;
  return OK;
}
CUresult cuDeviceGetPCIBusId(char *id, int len, CUdevice d) {
  (void)d;
  snprintf(id, (size_t)len, "0000:00:00.0");
  return OK;
}
CUresult cuDeviceGetLuid(char *luid, unsigned *mask, CUdevice d) {
  (void)luid; (void)mask; (void)d;
  return ERR_NOT_SUPPORTED; // Windows only, as on Linux drivers
}

// The H200 SXM's attributes (compute capability 9.0), as its driver reports them.
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
  (void)d;
  switch (attr) {
  case 1: *v = 1024; break;                // max threads per block
  case 2: case 3: *v = 1024; break;        // max block dim x, y
  case 4: *v = 64; break;                  // max block dim z
  case 5: *v = 2147483647; break;          // max grid dim x
  case 6: case 7: *v = 65535; break;       // max grid dim y, z
  case 8: *v = 49152; break;               // shared memory per block
  case 9: *v = 65536; break;               // total constant memory
  case 10: *v = 32; break;                 // warp size
  case 12: *v = 65536; break;              // registers per block
  case 13: *v = 1980000; break;            // clock rate, kHz
  case 14: *v = 512; break;                // texture alignment
  case 16: *v = 132; break;                // multiprocessors
  case 36: *v = 3201000; break;            // memory clock rate, kHz
  case 37: *v = 6144; break;               // memory bus width, bits
  case 38: *v = 52428800; break;           // L2 cache
  case 39: *v = 2048; break;               // max threads per multiprocessor
  case 41: *v = 1; break;                  // unified addressing
  case 75: *v = 9; break;                  // compute capability major
  case 76: *v = 0; break;                  // compute capability minor
  case 81: *v = 233472; break;             // shared memory per multiprocessor
  case 82: *v = 65536; break;              // registers per multiprocessor
  case 97: *v = 232448; break;             // shared memory per block, opt-in
  case 111: *v = 1024; break;              // reserved shared memory per block
  case 115: *v = 1; break;                 // memory pools supported
  default: {
    char line[64];
    snprintf(line, sizeof line, "attribute %d answered 0", attr);
    log_line("unknown", line);
    *v = 0;
  }
  }
  return OK;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice d) { (void)d; *ctx = handle_storage; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { (void)d; return OK; }
CUresult cuCtxSetCurrent(CUcontext ctx) { (void)ctx; return OK; }
CUresult cuCtxGetCurrent(CUcontext *ctx) { *ctx = handle_storage; return OK; }
CUresult cuCtxSynchronize(void) { return OK; }
CUresult cuCtxGetStreamPriorityRange(int *least, int *greatest) { *least = 0; *greatest = -5; return OK; }

// ---- memory: device memory is host memory ----
static CUresult alloc(CUdeviceptr *p, size_t n) {
  // Reserved, not committed: a kernel that never runs never touches most of it.
  void *m = mmap(NULL, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return ERR_OUT_OF_MEMORY;
  *p = (CUdeviceptr)(uintptr_t)m;
  return OK;
}
// munmap needs the length, which cuMemFree does not get: a header would shift the alignment
// the kernels' loads assume, so freed blocks are left mapped (the run is short).
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { return alloc(p, n); }
CUresult cuMemAllocAsync(CUdeviceptr *p, size_t n, CUstream s) { (void)s; return alloc(p, n); }
CUresult cuMemFree_v2(CUdeviceptr p) { (void)p; return OK; }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) { (void)p; (void)s; return OK; }
CUresult cuMemAllocHost_v2(void **p, size_t n) { *p = malloc(n ? n : 1); return *p ? OK : ERR_OUT_OF_MEMORY; }
CUresult cuMemFreeHost(void *p) { free(p); return OK; }
CUresult cuMemGetInfo_v2(size_t *free_, size_t *total) {
  *total = (size_t)143771 << 20;
  *free_ = *total - ((size_t)512 << 20);
  return OK;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
  (void)s; memcpy((void *)(uintptr_t)dst, src, n); return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s) {
  (void)s; memcpy(dst, (const void *)(uintptr_t)src, n); return OK;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
  (void)s; memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n); return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) { return cuMemcpyHtoDAsync_v2(dst, src, n, 0); }
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, 0); }
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
  (void)s; memset((void *)(uintptr_t)dst, v, n); return OK;
}

typedef struct {
  size_t srcXInBytes, srcY;
  int srcMemoryType;
  const void *srcHost;
  CUdeviceptr srcDevice;
  void *srcArray;
  size_t srcPitch;
  size_t dstXInBytes, dstY;
  int dstMemoryType;
  void *dstHost;
  CUdeviceptr dstDevice;
  void *dstArray;
  size_t dstPitch;
  size_t WidthInBytes, Height;
} CUDA_MEMCPY2D;

enum { MEMORY_HOST = 1 };

CUresult cuMemcpy2DAsync_v2(const CUDA_MEMCPY2D *c, CUstream s) {
  (void)s;
  const char *src = c->srcMemoryType == MEMORY_HOST ? (const char *)c->srcHost : (const char *)(uintptr_t)c->srcDevice;
  char *dst = c->dstMemoryType == MEMORY_HOST ? (char *)c->dstHost : (char *)(uintptr_t)c->dstDevice;
  for (size_t row = 0; row < c->Height; row++)
    memmove(dst + (c->dstY + row) * c->dstPitch + c->dstXInBytes,
            src + (c->srcY + row) * c->srcPitch + c->srcXInBytes, c->WidthInBytes);
  return OK;
}

// ---- streams and events: everything is done by the time a call returns ----
CUresult cuStreamCreate(CUstream *s, unsigned flags) { (void)flags; *s = handle_storage; return OK; }
CUresult cuStreamCreateWithPriority(CUstream *s, unsigned flags, int prio) { (void)flags; (void)prio; *s = handle_storage; return OK; }
CUresult cuStreamDestroy_v2(CUstream s) { (void)s; return OK; }
CUresult cuStreamSynchronize(CUstream s) { (void)s; return OK; }
CUresult cuStreamQuery(CUstream s) { (void)s; return OK; }
CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) { (void)s; (void)e; (void)flags; return OK; }
CUresult cuEventCreate(CUevent *e, unsigned flags) { (void)flags; *e = handle_storage; return OK; }
CUresult cuEventRecord(CUevent e, CUstream s) { (void)e; (void)s; return OK; }
CUresult cuEventSynchronize(CUevent e) { (void)e; return OK; }
CUresult cuEventQuery(CUevent e) { (void)e; return OK; }
CUresult cuEventDestroy_v2(CUevent e) { (void)e; return OK; }
CUresult cuEventElapsedTime(float *ms, CUevent a, CUevent b) { (void)a; (void)b; *ms = 0.001f; return OK; }
CUresult cuEventElapsedTime_v2(float *ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

// ---- modules and launches ----
typedef struct { char *ptx; unsigned long id; } Module;
typedef struct { Module *module; char name[256]; int launched; } Function;

CUresult cuModuleLoadData(CUmodule *out, const void *image) {
  Module *m = calloc(1, sizeof *m);
  m->ptx = strdup((const char *)image);
  pthread_mutex_lock(&lock);
  m->id = ++modules;
  pthread_mutex_unlock(&lock);
  const char *dir = getenv("CUDA_STAND_IN_DIR");
  if (dir) {
    char path[4096];
    // Named by process and load order: several processes may write into one folder.
    snprintf(path, sizeof path, "%s/ptx/%d-%06lu.ptx", dir, (int)getpid(), m->id);
    FILE *f = fopen(path, "w");
    if (!f) return ERR_INVALID_VALUE;
    fputs(m->ptx, f);
    fclose(f);
  }
  *out = m;
  return OK;
}
CUresult cuModuleUnload(CUmodule m) { (void)m; return OK; }
CUresult cuModuleGetFunction(CUfunction *out, CUmodule mod, const char *name) {
  Module *m = mod;
  // The entry point has to be in the PTX, as the driver would insist.
  char needle[300];
  snprintf(needle, sizeof needle, ".entry %s(", name);
  if (!strstr(m->ptx, needle)) {
    snprintf(needle, sizeof needle, ".entry %s", name);
    if (!strstr(m->ptx, needle)) return 500; // CUDA_ERROR_NOT_FOUND
  }
  Function *f = calloc(1, sizeof *f);
  f->module = m;
  snprintf(f->name, sizeof f->name, "%s", name);
  *out = f;
  return OK;
}
CUresult cuFuncSetAttribute(CUfunction f, int attr, int value) {
  (void)f;
  // Dynamic shared memory above the opt-in limit is refused, as by the driver.
  if (attr == 8 && value > 232448) return ERR_INVALID_VALUE;
  return OK;
}
CUresult cuFuncGetAttribute(int *v, int attr, CUfunction f) { (void)attr; (void)f; *v = 0; return OK; }

CUresult cuLaunchKernel(CUfunction fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, CUstream s, void **params, void **extra) {
  (void)s; (void)params; (void)extra;
  Function *f = fn;
  if (!gx || !gy || !gz || !bx || !by || !bz || bx * by * bz > 1024 || bz > 64 || gy > 65535 || gz > 65535 ||
      shared > 232448) {
    char line[512];
    snprintf(line, sizeof line, "%d-%06lu %s grid %u,%u,%u block %u,%u,%u shared %u", (int)getpid(), f->module->id, f->name,
             gx, gy, gz, bx, by, bz, shared);
    log_line("bad-launch", line);
    return ERR_INVALID_VALUE; // CUDA_ERROR_INVALID_VALUE, as the driver answers
  }
  pthread_mutex_lock(&lock);
  int first = !f->launched;
  f->launched = 1;
  pthread_mutex_unlock(&lock);
  if (first) { // one line per kernel: its module and entry point
    char line[400];
    snprintf(line, sizeof line, "%d-%06lu %s", (int)getpid(), f->module->id, f->name);
    log_line("launched", line);
  }
  return OK;
}

// Hopper's tensor-memory descriptors: encoded by the driver, read by the kernel. Zero is as good
// as any other value for a kernel that does not run.
CUresult cuTensorMapEncodeTiled(void *map, ...) { memset(map, 0, 128); return OK; }
CUresult cuTensorMapEncodeIm2col(void *map, ...) { memset(map, 0, 128); return OK; }
CUresult cuTensorMapEncodeIm2colWide(void *map, ...) { memset(map, 0, 128); return OK; }

CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "stand-in driver error"; return OK; }
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = "CUDA_ERROR_STAND_IN"; return OK; }
