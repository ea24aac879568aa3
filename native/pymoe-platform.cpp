// Platform code (see pymoe-platform.h): files, mappings, memory; and the
// process-wide I/O fault injector that tests use on the read path.
#include "pymoe-platform.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>

#if defined(_WIN32)
#    ifndef WIN32_LEAN_AND_MEAN
#        define WIN32_LEAN_AND_MEAN
#    endif
#    ifndef NOMINMAX
#        define NOMINMAX
#    endif
#    include <windows.h>
#    include <malloc.h>
#else
#    include <fcntl.h>
#    include <sys/mman.h>
#    include <sys/stat.h>
#    include <unistd.h>
#    if defined(__APPLE__)
#        include <mach/mach.h>
#    endif
#endif

namespace pymoe {

namespace {

uint64_t align_down(uint64_t x) { return x & ~(k_io_align - 1); }
uint64_t align_up(uint64_t x) { return (x + k_io_align - 1) & ~(k_io_align - 1); }

//
// fault injection (tests): decides the fate of each read request
//

enum io_fault_kind : int {
    IO_FAULT_NONE    = 0,
    IO_FAULT_EIO     = 1,  // the request fails with EIO
    IO_FAULT_SHORT   = 2,  // the request gets fewer bytes, then the end of the file
    IO_FAULT_EINTR   = 3,  // the first OS call is interrupted (the request retries it)
    IO_FAULT_PARTIAL = 4,  // the first OS call returns fewer bytes; the rest follows
};

struct io_fault_state {
    std::mutex           mutex;
    std::atomic<bool>    armed{ false };
    io_fault_kind        kind  = IO_FAULT_NONE;
    int64_t              first = 0;  // request numbers [first, first + count) fail, counted from io_fault_set
    int64_t              count = 0;
    int64_t              seen  = 0;  // requests since io_fault_set
};

io_fault_state & faults() {
    static io_fault_state s;
    return s;
}

io_fault_kind io_fault_next() {
    io_fault_state & s = faults();
    if (!s.armed.load(std::memory_order_acquire)) {
        return IO_FAULT_NONE;
    }
    std::lock_guard<std::mutex> lock(s.mutex);
    const int64_t               n = ++s.seen;
    return n >= s.first && n < s.first + s.count ? s.kind : IO_FAULT_NONE;
}

//
// one OS call
//

struct os_result {
    int64_t bytes = 0;      // >= 0: bytes read (0: the end of the file)
    bool    interrupted = false;
    int     error = 0;      // errno, or GetLastError() on Windows
};

std::string os_error_message(int error) {
#if defined(_WIN32)
    char        buf[512] = {};
    const DWORD n = FormatMessageA(FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS, nullptr, (DWORD) error,
                                   0, buf, sizeof(buf), nullptr);
    std::string s(buf, n);
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '.')) {
        s.pop_back();
    }
    return s.empty() ? "Windows error " + std::to_string(error) : s;
#else
    return std::strerror(error);  // glibc, musl and Darwin keep these strings constant
#endif
}

int os_error_eio() {
#if defined(_WIN32)
    return ERROR_READ_FAULT;
#else
    return EIO;
#endif
}

os_result os_read_at(intptr_t h, uint8_t * dst, uint64_t size, uint64_t offset) {
    os_result r;
#if defined(_WIN32)
    // The handles are opened with FILE_FLAG_OVERLAPPED, so that reads from several
    // threads run in parallel (a synchronous handle serialises them); each thread
    // waits for its own read on its own event.
    struct thread_event {
        HANDLE h = CreateEventW(nullptr, TRUE, FALSE, nullptr);
        ~thread_event() { CloseHandle(h); }
    };
    thread_local thread_event event;
    OVERLAPPED                ov = {};
    ov.Offset                    = (DWORD) (offset & 0xffffffffu);
    ov.OffsetHigh                = (DWORD) (offset >> 32);
    ov.hEvent                    = event.h;
    const DWORD ask              = (DWORD) std::min<uint64_t>(size, 1u << 30);
    DWORD       got              = 0;
    BOOL        ok               = ReadFile((HANDLE) h, dst, ask, nullptr, &ov);
    if (!ok && GetLastError() == ERROR_IO_PENDING) {
        ok = TRUE;
    }
    if (ok) {
        ok = GetOverlappedResult((HANDLE) h, &ov, &got, TRUE);
    }
    if (ok) {
        r.bytes = got;
    } else {
        const DWORD err = GetLastError();
        if (err == ERROR_HANDLE_EOF) {
            r.bytes = 0;
        } else {
            r.bytes = -1;
            r.error = (int) err;
        }
    }
#else
    const size_t  ask = (size_t) std::min<uint64_t>(size, (uint64_t) std::numeric_limits<ssize_t>::max());
    const ssize_t n   = pread((int) h, dst, ask, (off_t) offset);
    if (n >= 0) {
        r.bytes = n;
    } else if (errno == EINTR) {
        r.interrupted = true;
    } else {
        r.bytes = -1;
        r.error = errno;
    }
#endif
    return r;
}

void os_close(intptr_t h) {
#if defined(_WIN32)
    CloseHandle((HANDLE) h);
#else
    close((int) h);
#endif
}

#if defined(_WIN32)
std::wstring utf8_to_wide(const std::string & s) {
    if (s.empty()) {
        return {};
    }
    const int    n = MultiByteToWideChar(CP_UTF8, 0, s.data(), (int) s.size(), nullptr, 0);
    std::wstring w((size_t) std::max(n, 0), L'\0');
    MultiByteToWideChar(CP_UTF8, 0, s.data(), (int) s.size(), w.data(), n);
    return w;
}
#endif

// k_invalid on failure, with `error` set
intptr_t os_open(const std::string & path, bool uncached, int & error) {
#if defined(_WIN32)
    const DWORD flags =
        FILE_ATTRIBUTE_NORMAL | FILE_FLAG_OVERLAPPED | (uncached ? FILE_FLAG_NO_BUFFERING : FILE_FLAG_RANDOM_ACCESS);
    HANDLE      h     = CreateFileW(utf8_to_wide(path).c_str(), GENERIC_READ, FILE_SHARE_READ | FILE_SHARE_DELETE,
                                    nullptr, OPEN_EXISTING, flags, nullptr);
    if (h == INVALID_HANDLE_VALUE) {
        error = (int) GetLastError();
        return -1;
    }
    return (intptr_t) h;
#else
    int oflags = O_RDONLY | O_CLOEXEC;
#    if defined(O_DIRECT)
    if (uncached) {
        oflags |= O_DIRECT;
    }
#    elif !defined(__APPLE__)
    if (uncached) {
        error = ENOTSUP;  // no way to bypass the cache on this OS
        return -1;
    }
#    endif
    const int fd = open(path.c_str(), oflags);
    if (fd < 0) {
        error = errno;
        return -1;
    }
#    if defined(__APPLE__)
    if (uncached && fcntl(fd, F_NOCACHE, 1) == -1) {
        error = errno;
        close(fd);
        return -1;
    }
#    endif
    return fd;
#endif
}

}  // namespace

//
// memory
//

uint64_t page_size() {
#if defined(_WIN32)
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwPageSize;
#else
    return (uint64_t) sysconf(_SC_PAGESIZE);
#endif
}

void aligned_deleter::operator()(uint8_t * p) const {
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

aligned_buffer aligned_alloc_bytes(size_t bytes) {
    void * p = nullptr;
#if defined(_WIN32)
    p = _aligned_malloc(std::max<size_t>(bytes, 1), k_io_align);
#else
    if (posix_memalign(&p, k_io_align, std::max<size_t>(bytes, 1)) != 0) {
        p = nullptr;
    }
#endif
    if (!p) {
        throw std::runtime_error("out of memory for a read buffer of " + std::to_string(bytes) +
                                 " bytes; hint: lower the expert budget or --io-threads");
    }
    return aligned_buffer(static_cast<uint8_t *>(p));
}

//
// files
//

platform_file::platform_file(const std::string & path, bool uncached) : path_(path) {
    int error = 0;
    h_        = os_open(path, false, error);
    if (h_ == k_invalid) {
        throw std::runtime_error("cannot open '" + path + "': " + os_error_message(error));
    }
    if (uncached) {
        h_uncached_ = os_open(path, true, error);  // k_invalid on file systems without it: buffered reads
    }
}

platform_file::~platform_file() {
    if (h_uncached_ != k_invalid) {
        os_close(h_uncached_);
    }
    if (h_ != k_invalid) {
        os_close(h_);
    }
}

uint64_t platform_file::read_request(intptr_t h, bool aligned, uint64_t offset, uint64_t size, uint64_t need,
                                     uint8_t * dst) {
    // An injected fault stands in for the first OS call's result, so that it
    // takes the same path as the real failure would.
    const io_fault_kind fault = io_fault_next();
    // "short": the file looks as if it ended halfway through what the caller needs;
    // "partial": the first call returns about half of what it asked for
    const uint64_t short_end = aligned ? align_down(need / 2) : need / 2;
    const uint64_t part      = aligned ? align_down(size / 2) : size / 2;
    bool           first     = true;
    uint64_t       done      = 0;
    while (done < size) {
        uint64_t ask = size - done;
        if (fault == IO_FAULT_SHORT) {
            if (done >= short_end) {
                break;
            }
            ask = std::min(ask, short_end - done);
        } else if (first && fault == IO_FAULT_PARTIAL && part > 0) {
            ask = part;
        }
        os_result r;
        if (first && fault == IO_FAULT_EINTR) {
            r.interrupted = true;
        } else if (first && fault == IO_FAULT_EIO) {
            r.bytes = -1;
            r.error = os_error_eio();
        } else {
            r = os_read_at(h, dst + done, ask, offset + done);
        }
        first = false;
        if (r.interrupted) {
            continue;  // nothing was read: ask again
        }
        if (r.bytes < 0) {
            throw std::runtime_error("reading '" + path_ + "' at byte " + std::to_string(offset + done) +
                                     " failed: " + os_error_message(r.error) +
                                     "; hint: the disk or its file system could not read the file; check them, or "
                                     "copy the model to another disk");
        }
        if (r.bytes == 0) {
            break;  // the end of the file
        }
        done += (uint64_t) r.bytes;
        if (aligned && done % k_io_align != 0) {
            break;  // only the end of the file ends an uncached read off the alignment
        }
    }
    return done;
}

void platform_file::read(uint64_t offset, uint64_t size, uint8_t * dst) {
    const uint64_t got = read_request(h_, false, offset, size, size, dst);
    if (got < size) {
        throw std::runtime_error("'" + path_ + "' ends before byte " + std::to_string(offset + size) +
                                 " (read stopped at byte " + std::to_string(offset + got) +
                                 "); hint: the file is truncated");
    }
}

const uint8_t * platform_file::read_uncached(uint64_t offset, uint64_t size, uint8_t * buf) {
    if (!uncached()) {
        read(offset, size, buf);
        drop_cache(offset, size);
        return buf;
    }
    // the aligned span around [offset, offset + size); the file's end may cut it short
    const uint64_t a0  = align_down(offset);
    const uint64_t a1  = align_up(offset + size);
    const uint64_t need = offset - a0 + size;
    const uint64_t got  = read_request(h_uncached_, true, a0, a1 - a0, need, buf);
    if (got < need) {
        throw std::runtime_error("'" + path_ + "' ends before byte " + std::to_string(offset + size) +
                                 " (read stopped at byte " + std::to_string(a0 + got) +
                                 "); hint: the file is truncated");
    }
    return buf + (offset - a0);
}

bool platform_file::drop_cache(uint64_t offset, uint64_t size) const {
#if defined(__linux__)
    return posix_fadvise((int) h_, (off_t) offset, (off_t) size, POSIX_FADV_DONTNEED) == 0;
#else
    (void) offset;
    (void) size;
    return false;
#endif
}

//
// mappings
//

namespace {

// the page-aligned hull of [addr, addr + size)
std::pair<uintptr_t, size_t> page_hull(const void * addr, size_t size) {
    const uintptr_t page = (uintptr_t) page_size();
    const uintptr_t a    = (uintptr_t) addr & ~(page - 1);
    const uintptr_t b    = ((uintptr_t) addr + size + page - 1) & ~(page - 1);
    return { a, (size_t) (b - a) };
}

}  // namespace

bool mapping_will_need(const void * addr, size_t size) {
    if (size == 0) {
        return true;
    }
    const auto [a, n] = page_hull(addr, size);
#if defined(_WIN32)
    // Windows 8+; looked up so that the extension still loads where it is missing
    using prefetch_fn = BOOL(WINAPI *)(HANDLE, ULONG_PTR, PWIN32_MEMORY_RANGE_ENTRY, ULONG);
    static const auto prefetch =
        (prefetch_fn) (void *) GetProcAddress(GetModuleHandleW(L"kernel32.dll"), "PrefetchVirtualMemory");
    if (!prefetch) {
        return false;
    }
    WIN32_MEMORY_RANGE_ENTRY range;
    range.VirtualAddress = (PVOID) a;
    range.NumberOfBytes  = n;
    return prefetch(GetCurrentProcess(), 1, &range, 0) != 0;
#else
    return posix_madvise((void *) a, n, POSIX_MADV_WILLNEED) == 0;
#endif
}

bool mapping_release(const void * addr, size_t size) {
    if (size == 0) {
        return true;
    }
    const auto [a, n] = page_hull(addr, size);
#if defined(_WIN32)
    // on pages that are not locked, VirtualUnlock removes them from the working set
    // (it then fails with ERROR_NOT_LOCKED, which is the expected outcome)
    VirtualUnlock((LPVOID) a, n);
    return true;
#elif defined(__linux__)
    return madvise((void *) a, n, MADV_DONTNEED) == 0;
#else
    madvise((void *) a, n, MADV_DONTNEED);  // a hint: the pages stay until the OS needs them
    return false;
#endif
}

//
// pymoe.h: capabilities, available memory, fault injection, a test read
//

namespace {

#if defined(__linux__)
// the first number in a file (memory.max holds "max" when unlimited: none)
bool read_u64(const std::string & path, uint64_t & out) {
    std::ifstream f(path);
    std::string   s;
    if (!(f >> s) || s.empty() || s.find_first_not_of("0123456789") != std::string::npos) {
        return false;
    }
    out = std::stoull(s);
    return true;
}

// limit - usage of this process's memory cgroups (v2, or v1's memory controller); false when unlimited
bool cgroup_memory_left(uint64_t & left) {
    std::ifstream f("/proc/self/cgroup");
    std::string   line;
    bool          limited = false;
    while (std::getline(f, line)) {
        // "hierarchy-id:controllers:path"
        const size_t c1 = line.find(':');
        const size_t c2 = c1 == std::string::npos ? std::string::npos : line.find(':', c1 + 1);
        if (c2 == std::string::npos) {
            continue;
        }
        const std::string controllers = line.substr(c1 + 1, c2 - c1 - 1);
        const std::string rel         = line.substr(c2 + 1);
        std::string       limit_file, usage_file;
        if (controllers.empty()) {  // v2
            limit_file = "/sys/fs/cgroup" + rel + "/memory.max";
            usage_file = "/sys/fs/cgroup" + rel + "/memory.current";
        } else if (("," + controllers + ",").find(",memory,") != std::string::npos) {  // v1
            limit_file = "/sys/fs/cgroup/memory" + rel + "/memory.limit_in_bytes";
            usage_file = "/sys/fs/cgroup/memory" + rel + "/memory.usage_in_bytes";
        } else {
            continue;
        }
        uint64_t limit = 0, usage = 0;
        if (!read_u64(limit_file, limit) || limit >= (1ull << 60)) {
            continue;  // unlimited (v1 reports a huge number, v2 "max")
        }
        read_u64(usage_file, usage);
        const uint64_t l = limit > usage ? limit - usage : 0;
        left             = limited ? std::min(left, l) : l;
        limited          = true;
    }
    return limited;
}
#endif

}  // namespace

uint64_t available_memory() {
#if defined(__linux__)
    uint64_t      avail = 0;
    bool          found = false;
    std::ifstream f("/proc/meminfo");
    std::string   key;
    uint64_t      kib = 0;
    std::string   unit;
    while (f >> key >> kib) {
        std::getline(f, unit);
        if (key == "MemAvailable:") {
            avail = kib * 1024;
            found = true;
            break;
        }
    }
    if (!found) {
        avail = (uint64_t) sysconf(_SC_AVPHYS_PAGES) * page_size();
    }
    uint64_t left = 0;
    if (cgroup_memory_left(left)) {
        avail = std::min(avail, left);
    }
    return avail;
#elif defined(__APPLE__)
    vm_statistics64_data_t vm;
    mach_msg_type_number_t n = HOST_VM_INFO64_COUNT;
    if (host_statistics64(mach_host_self(), HOST_VM_INFO64, (host_info64_t) &vm, &n) != KERN_SUCCESS) {
        return 0;
    }
    return ((uint64_t) vm.free_count + (uint64_t) vm.inactive_count) * page_size();
#elif defined(_WIN32)
    MEMORYSTATUSEX ms;
    ms.dwLength = sizeof(ms);
    return GlobalMemoryStatusEx(&ms) ? (uint64_t) ms.ullAvailPhys : 0;
#else
    return 0;
#endif
}

platform_caps platform_capabilities(const std::string & path) {
    // os, uncached reads, drop file cache, mapping: will need, mapping: release, memory limit, how measured
#if defined(__linux__)
    platform_caps c{ "linux", true, true, true, true, true,
                     "MemAvailable, capped by the cgroup's memory limit (v1 or v2)" };
#elif defined(__APPLE__)
    platform_caps c{ "macos", true, false, true, false, false, "host_statistics64: free + inactive pages" };
#elif defined(_WIN32)
    platform_caps c{ "windows", true, false, true, true, false,
                     "GlobalMemoryStatusEx: available physical memory (job object limits not read)" };
#else
    platform_caps c{ "unknown", false, false, false, false, false, "not measured" };
#endif
    if (!path.empty()) {
        platform_file f(path, true);
        c.uncached_reads = c.uncached_reads && f.uncached();
    }
    return c;
}

void io_fault_set(const std::string & kind, int64_t nth, int64_t count) {
    io_fault_kind k = IO_FAULT_NONE;
    if (kind == "eio") {
        k = IO_FAULT_EIO;
    } else if (kind == "short") {
        k = IO_FAULT_SHORT;
    } else if (kind == "eintr") {
        k = IO_FAULT_EINTR;
    } else if (kind == "partial") {
        k = IO_FAULT_PARTIAL;
    } else {
        throw std::invalid_argument("unknown I/O fault '" + kind + "'; hint: eio, short, eintr or partial");
    }
    if (nth < 1 || count < 1) {
        throw std::invalid_argument("io_fault: nth and count start at 1; hint: nth=1 fails the next read request");
    }
    io_fault_state &            s = faults();
    std::lock_guard<std::mutex> lock(s.mutex);
    s.kind  = k;
    s.first = nth;
    s.count = count;
    s.seen  = 0;
    s.armed.store(true, std::memory_order_release);
}

void io_fault_clear() {
    io_fault_state &            s = faults();
    std::lock_guard<std::mutex> lock(s.mutex);
    s.armed.store(false, std::memory_order_release);
    s.kind = IO_FAULT_NONE;
    s.seen = 0;
}

std::string platform_read(const std::string & path, uint64_t offset, uint64_t size, bool uncached) {
    platform_file f(path, uncached);
    if (!uncached) {
        std::string out(size, '\0');
        f.read(offset, size, reinterpret_cast<uint8_t *>(out.data()));
        return out;
    }
    aligned_buffer  buf = aligned_alloc_bytes(platform_file::read_span(size));
    const uint8_t * p   = f.read_uncached(offset, size, buf.get());
    return std::string(reinterpret_cast<const char *>(p), size);
}

}  // namespace pymoe
