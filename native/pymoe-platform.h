// Platform code: the one place in native/ that asks the operating system for
// files, mappings and memory (as llama.cpp keeps its own in llama-mmap.cpp).
// Linux, macOS and Windows. Where an OS cannot do a thing the call returns
// false (or does nothing), and platform_capabilities() in pymoe.h says so.
//
// What each OS does:
//   uncached reads      Linux O_DIRECT; macOS F_NOCACHE; Windows FILE_FLAG_NO_BUFFERING + ReadFile(OVERLAPPED)
//                       (an overlapped handle, so that the I/O threads' reads run in parallel).
//                       Where the file system refuses (tmpfs, some network file systems): buffered reads,
//                       then the range is dropped from the cache where the OS allows it.
//   dropping cached     Linux posix_fadvise(DONTNEED). macOS and Windows: no call drops a file range
//   pages of a file     from the OS cache (there the OS evicts clean file pages under pressure itself).
//   mapping: will need  POSIX posix_madvise(WILLNEED); Windows PrefetchVirtualMemory.
//   mapping: release    Linux madvise(DONTNEED) unmaps the pages (the page cache keeps mapped pages);
//                       Windows VirtualUnlock removes them from the working set. macOS: madvise(DONTNEED)
//                       only lowers their priority, so it is reported as not released.
//   available memory    Linux MemAvailable capped by the cgroup's limit - usage (v2 memory.max, v1
//                       memory.limit_in_bytes); macOS host_statistics64 (free + inactive pages);
//                       Windows GlobalMemoryStatusEx (ullAvailPhys).
// macOS F_RDADVISE is not used: it reads ahead into the buffer cache, the
// cache that F_NOCACHE reads keep out of; for the mapping, madvise(WILLNEED)
// asks for the same read-ahead.
#pragma once

#include "pymoe.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace pymoe {

//
// memory
//

// Offsets, lengths and buffers of uncached reads are multiples of this
// (O_DIRECT: the logical block size; NO_BUFFERING: the sector size; 4096 covers both).
constexpr uint64_t k_io_align = 4096;

uint64_t page_size();

struct aligned_deleter {
    void operator()(uint8_t * p) const;
};
using aligned_buffer = std::unique_ptr<uint8_t, aligned_deleter>;

// `bytes` aligned to k_io_align; throws std::runtime_error when out of memory
aligned_buffer aligned_alloc_bytes(size_t bytes);

//
// files
//

// A file opened for positioned reads from any thread.
class platform_file {
  public:
    // Opens `path` for reading; with `uncached`, also a handle whose reads
    // bypass the OS cache, when the file system allows it (see uncached()).
    // Throws std::runtime_error naming the file when it cannot be opened.
    platform_file(const std::string & path, bool uncached);
    ~platform_file();
    platform_file(const platform_file &)             = delete;
    platform_file & operator=(const platform_file &) = delete;

    const std::string & path() const { return path_; }
    // reads of read_uncached() bypass the OS cache
    bool                uncached() const { return h_uncached_ != k_invalid; }

    // Reads exactly [offset, offset + size) into `dst` through the OS cache.
    // Interrupted and partial reads are retried; an OS error or the end of the
    // file throws std::runtime_error naming the file, the offset and the error.
    void read(uint64_t offset, uint64_t size, uint8_t * dst);

    // Reads [offset, offset + size) past the OS cache: the aligned span around
    // the range goes into `buf` (k_io_align-aligned, at least read_span(size)
    // bytes) and the range's first byte in `buf` is returned. Without an
    // uncached handle: a buffered read into `buf`, then drop_cache(). Throws as read().
    const uint8_t * read_uncached(uint64_t offset, uint64_t size, uint8_t * buf);

    static uint64_t read_span(uint64_t size) { return size + 2 * k_io_align; }

    // Drops the file's cached pages that lie wholly inside the range; false where the OS cannot.
    bool drop_cache(uint64_t offset, uint64_t size) const;

  private:
    // One read request: up to `size` bytes at `offset`, of which the caller
    // needs the first `need`. Retries interrupted calls and continues partial
    // ones; returns the bytes read, fewer only at the end of the file. Throws on
    // an OS error. The fault injector (io_fault_set) acts here.
    uint64_t read_request(intptr_t h, bool aligned, uint64_t offset, uint64_t size, uint64_t need, uint8_t * dst);

    static constexpr intptr_t k_invalid = -1;  // a closed fd / INVALID_HANDLE_VALUE

    std::string path_;
    intptr_t    h_          = k_invalid;  // buffered: int fd, or a Windows HANDLE
    intptr_t    h_uncached_ = k_invalid;
};

//
// mappings (llama.cpp's mapping of the model file)
//

// Asks the OS to read the pages of [addr, addr + size) ahead; false where it cannot.
bool mapping_will_need(const void * addr, size_t size);
// Releases this process's pages of [addr, addr + size) (whole pages inside the
// range's page-aligned hull); they are read again on the next access. false
// where the OS can only be hinted.
bool mapping_release(const void * addr, size_t size);

}  // namespace pymoe
