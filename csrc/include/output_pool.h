// Recycled CPU memory for the large outputs of the ops (host only).
//
// Why: PyTorch's CPU allocator hands every large tensor fresh pages from the OS (glibc serves big
// blocks with mmap, or trims them off the heap when freed), so a buffer that a training step
// allocates and frees every step page-faults on each first touch. At step-2 shapes that is the
// 4 MB dWv of cmattn -- 1024 faults, ~0.3 ms per step on the 2-core CI box, as much as the GEMM
// that fills it. The pool keeps freed blocks of at least kMinBytes (up to a total cap) and gives
// them back to the next request of the same size; a tensor made from it behaves like any other
// (its storage stays resizable: a resize allocates from the pool and copies).
//
// GUIDG_FAST_CPU_POOL_MB (default 64) caps the bytes kept while no tensor uses them; 0 turns the
// pool off (every output then comes from at::empty).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

namespace guidg_fast {

class CpuOutputPool final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(64) << 10;  // smaller blocks: malloc reuses them well

  static CpuOutputPool& instance() {
    static CpuOutputPool* pool = new CpuOutputPool();  // never destroyed: tensors may outlive static teardown
    return *pool;
  }

  bool enabled() const { return cap_ > 0; }

  c10::DataPtr allocate(size_t n) override {
    void* p = take(n);
    if (p == nullptr && n > 0) p = c10::alloc_cpu(n);
    return {p, new Block{p, n}, &CpuOutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // bytes held now for reuse (for tests)
  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  CpuOutputPool() {
    const char* mb = std::getenv("GUIDG_FAST_CPU_POOL_MB");
    cap_ = (mb != nullptr ? static_cast<size_t>(std::max(0L, std::strtol(mb, nullptr, 10))) : size_t(64)) << 20;
  }

  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = free_.size(); i-- > 0;) {  // the most recently freed first: likely still in cache
      if (free_[i].second == n) {
        void* p = free_[i].first;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        cached_ -= n;
        return p;
      }
    }
    return nullptr;
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    instance().give_back(block->ptr, block->size);
    delete block;
  }

  void give_back(void* p, size_t n) {
    if (p == nullptr) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (n >= kMinBytes && cached_ + n <= cap_) {
        free_.emplace_back(p, n);
        cached_ += n;
        return;
      }
    }
    c10::free_cpu(p);
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t cached_ = 0;
  size_t cap_ = 0;
};

// An uninitialised contiguous tensor; large CPU ones come from the pool above.
inline at::Tensor pooled_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  CpuOutputPool& pool = CpuOutputPool::instance();
  if (options.device().is_cpu() && pool.enabled()) {
    const size_t bytes =
        static_cast<size_t>(c10::multiply_integers(shape)) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
    if (bytes >= CpuOutputPool::kMinBytes) {
      return at::detail::empty_generic(shape, &pool, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
    }
  }
  return at::empty(shape, options);
}

}  // namespace guidg_fast
