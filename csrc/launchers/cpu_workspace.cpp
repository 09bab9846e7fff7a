// The kept CPU gradient block (cpu_workspace.h): one mmap'd block, a flag saying whether a
// returned gradient holds it, and a mutex for handing it out.
#include "launchers/cpu_workspace.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <new>

namespace opd_fast {
namespace {

struct Block {
  explicit Block(size_t size) : bytes(size) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data = p;
  }
  ~Block() { munmap(data, bytes); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  void* data = nullptr;
  size_t bytes = 0;
  std::atomic<bool> held{false};
};

struct Workspace {
  std::mutex mutex;
  std::shared_ptr<Block> block;
};

// Never destroyed: a gradient may outlive static destruction (its deleter holds the block).
Workspace& workspace() {
  static auto* kept = new Workspace;
  return *kept;
}

size_t largest_kept_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return size_t(pages) * size_t(page_size) / 4;
}

}  // namespace

at::Tensor cpu_gradient_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  static const size_t kLargest = largest_kept_bytes();
  if (bytes == 0 || bytes > kLargest) return at::empty(sizes, options);
  std::shared_ptr<Block> block;
  {
    Workspace& kept = workspace();
    std::lock_guard<std::mutex> lock(kept.mutex);
    if (kept.block && kept.block->held.load(std::memory_order_acquire)) {
      return at::empty(sizes, options);  // a gradient still holds it: a fresh one
    }
    if (!kept.block || kept.block->bytes < bytes) {
      kept.block.reset();  // unmapped here: no gradient holds it
      kept.block = std::make_shared<Block>(bytes);
    }
    block = kept.block;
    block->held.store(true, std::memory_order_relaxed);
  }
  return at::for_blob(block->data, sizes)
      .options(options)
      .deleter([block](void*) { block->held.store(false, std::memory_order_release); })
      .make_tensor();
}

int64_t cpu_workspace_bytes() {
  Workspace& kept = workspace();
  std::lock_guard<std::mutex> lock(kept.mutex);
  return kept.block ? int64_t(kept.block->bytes) : 0;
}

bool cpu_workspace_in_use() {
  Workspace& kept = workspace();
  std::lock_guard<std::mutex> lock(kept.mutex);
  return kept.block && kept.block->held.load(std::memory_order_acquire);
}

void release_cpu_workspace() {
  Workspace& kept = workspace();
  std::lock_guard<std::mutex> lock(kept.mutex);
  kept.block.reset();
}

}  // namespace opd_fast
