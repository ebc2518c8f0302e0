// A stand-in for NVIDIA's CUPTI (`libcupti.so.13`) with the seven functions odpo's kernel census
// on libtorch's CUDA calls (crates/odpo-kernels/src/cupti.rs), so that the census's loading,
// callbacks, buffer handling and tally run on a machine without a GPU (that module's tests).
//
// No CUDA work is seen. Instead `standin_kernel(name, ns)`, `standin_copy(kind, src, dst, ns)` and
// `standin_fill(memory_kind, ns)` queue one record each, as CUPTI would for a kernel, copy or fill that ran,
// when that kind of record is switched on (and drop it otherwise). `cuptiActivityFlushAll` hands
// the queued records over the way CUPTI does: it asks the client's callback for a buffer, writes
// the records into it, and gives it back through the completion callback. Records are laid out as
// CUPTI 13's (`CUpti_ActivityKernel10`, `CUpti_ActivityMemcpy6`, `CUpti_ActivityMemset4` in
// cupti_activity.h): kind at 0, a copy's direction and memory kinds at 4, 5 and 6, start at 16,
// end at 24, a fill's memory kind at 50, a kernel's name at 104; each takes 128 bytes here, as
// `cuptiActivityGetNextRecord` walks them.
//
// Build: cc -shared -fPIC -O1 -o libcupti.so.13 libcupti.c
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

typedef int CUptiResult;
enum { OK = 0, ERR_INVALID_PARAMETER = 1, ERR_INVALID_KIND = 21, ERR_MAX_LIMIT_REACHED = 12, ERR_NOT_INITIALIZED = 15 };
enum { KIND_MEMCPY = 1, KIND_MEMSET = 2, KIND_CONCURRENT_KERNEL = 10 };
enum { RECORD = 128, QUEUE = 4096 };

typedef void (*Request)(uint8_t **buffer, size_t *size, size_t *max_records);
typedef void (*Complete)(void *context, uint32_t stream, uint8_t *buffer, size_t size, size_t valid);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static Request requested;
static Complete completed;
static int enabled[32];
static uint8_t queue[QUEUE][RECORD];
static size_t queued;
static uint64_t clock_ns = 1000;

CUptiResult cuptiActivityRegisterCallbacks(Request request, Complete complete) {
  if (!request || !complete) return ERR_INVALID_PARAMETER;
  requested = request;
  completed = complete;
  return OK;
}

static CUptiResult set_kind(uint32_t kind, int on) {
  if (kind != KIND_MEMCPY && kind != KIND_MEMSET && kind != KIND_CONCURRENT_KERNEL) return ERR_INVALID_KIND;
  enabled[kind] = on;
  return OK;
}

CUptiResult cuptiActivityEnable(uint32_t kind) { return set_kind(kind, 1); }
CUptiResult cuptiActivityDisable(uint32_t kind) { return set_kind(kind, 0); }

static void put(uint32_t kind, const uint8_t copy[3], uint16_t memory_kind, uint64_t ns, const char *name) {
  pthread_mutex_lock(&lock);
  if (enabled[kind] && queued < QUEUE) {
    uint8_t *r = queue[queued++];
    uint64_t start = clock_ns, end = clock_ns + ns;
    clock_ns = end + 100;
    memset(r, 0, RECORD);
    memcpy(r, &kind, 4);
    memcpy(r + 4, copy, 3);
    memcpy(r + 50, &memory_kind, 2);
    memcpy(r + 16, &start, 8);
    memcpy(r + 24, &end, 8);
    memcpy(r + 104, &name, sizeof name);
  }
  pthread_mutex_unlock(&lock);
}

// `name` must outlive the census (a string literal); CUPTI's own names live as long as the module.
static const uint8_t none[3];
void standin_kernel(const char *name, uint64_t ns) { put(KIND_CONCURRENT_KERNEL, none, 0, ns, name); }
// `copy_kind`, `src` and `dst` as CUPTI's CUpti_ActivityMemcpyKind and CUpti_ActivityMemoryKind.
void standin_copy(uint8_t copy_kind, uint8_t src, uint8_t dst, uint64_t ns) {
  const uint8_t c[3] = {copy_kind, src, dst};
  put(KIND_MEMCPY, c, 0, ns, NULL);
}
void standin_fill(uint16_t memory_kind, uint64_t ns) { put(KIND_MEMSET, none, memory_kind, ns, NULL); }

// `standin_fail_flush(code)`: the next flush answers `code` and delivers nothing, as CUPTI does
// without a driver (CUPTI_ERROR_UNKNOWN, 999).
static CUptiResult fail_flush;
void standin_fail_flush(CUptiResult code) { fail_flush = code; }

CUptiResult cuptiActivityFlushAll(uint32_t flag) {
  (void)flag;
  if (!requested) return ERR_NOT_INITIALIZED;
  if (fail_flush) {
    CUptiResult code = fail_flush;
    fail_flush = OK;
    pthread_mutex_lock(&lock);
    queued = 0;
    pthread_mutex_unlock(&lock);
    return code;
  }
  pthread_mutex_lock(&lock);
  size_t n = queued, done = 0;
  uint8_t *copy = malloc(n * RECORD + 1);
  if (!copy) {
    pthread_mutex_unlock(&lock);
    return ERR_NOT_INITIALIZED;
  }
  memcpy(copy, queue, n * RECORD);
  queued = 0;
  pthread_mutex_unlock(&lock);
  // Several buffers when one does not hold them all, as CUPTI fills one and asks for the next.
  while (done < n) {
    uint8_t *buffer = NULL;
    size_t size = 0, max_records = 0;
    requested(&buffer, &size, &max_records);
    if (!buffer || size < RECORD) break;  // the client declined: CUPTI drops the records
    size_t fit = size / RECORD;
    if (fit > 5) fit = 5;  // small buffers, so that the client sees more than one
    if (fit > n - done) fit = n - done;
    memcpy(buffer, copy + done * RECORD, fit * RECORD);
    done += fit;
    completed(NULL, 7, buffer, size, fit * RECORD);
  }
  free(copy);
  return OK;
}

CUptiResult cuptiActivityGetNextRecord(uint8_t *buffer, size_t valid, uint8_t **record) {
  uint8_t *next = *record ? *record + RECORD : buffer;
  if (next + RECORD > buffer + valid) return ERR_MAX_LIMIT_REACHED;
  *record = next;
  return OK;
}

CUptiResult cuptiActivityGetNumDroppedRecords(void *context, uint32_t stream, size_t *dropped) {
  (void)context;
  (void)stream;
  *dropped = 0;
  return OK;
}

CUptiResult cuptiGetResultString(CUptiResult result, const char **text) {
  *text = result == ERR_INVALID_KIND ? "CUPTI_ERROR_INVALID_KIND" : result == OK ? "CUPTI_SUCCESS" : "CUPTI_ERROR_UNKNOWN";
  return OK;
}
