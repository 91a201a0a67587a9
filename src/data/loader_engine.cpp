// LoaderEngine: the sampler stream, one HDF5 reader thread with a chunk
// cache, a pool of decode workers and a bounded, ordered hand-off to the
// training loop; what a sample reads and how it is decoded are the loader's.

#include "src/data/loader_engine.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <new>
#include <numeric>
#include <thread>
#include <utility>

#include "dtrain/error.h"

namespace dtrain::data::detail {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One chunk of one field of one shard in the reader's cache.
struct ChunkSlot {
  ChunkBytes data;                        // null while not cached
  std::size_t bytes = 0;                  // size of data
  std::int64_t stamp = -1;                // seq of the last batch that used the chunk
  const unsigned char* pinned = nullptr;  // the chunk's bytes that batch `stamp` holds
  ChunkSlot* newer = nullptr;             // LRU neighbours while cached
  ChunkSlot* older = nullptr;
};

// The chunks of one (field, shard), indexed by chunk number.
struct ChunkTable {
  int field = 0;
  std::int64_t shard_begin = 0, shard_samples = 0, chunk_len = 1;
  std::size_t sample_bytes = 0;
  std::vector<ChunkSlot> slots;
};

// Output memory recycled across batches. Fresh at::empty outputs of a few
// hundred KiB per batch are, under glibc malloc, often handed back to the
// kernel when freed and page-faulted in again for the next batch; that cost
// more than the decode itself. A block goes back to the pool when the last
// tensor made from it is destroyed (so a caller may keep batches as long as
// it likes).
class OutputPool : public std::enable_shared_from_this<OutputPool> {
 public:
  explicit OutputPool(std::size_t keep) : keep_(keep) {}
  ~OutputPool() {
    for (const Block& b : free_) std::free(b.data);
  }
  OutputPool(const OutputPool&) = delete;
  OutputPool& operator=(const OutputPool&) = delete;

  /// A 64-byte aligned block of `bytes` (> 0).
  std::shared_ptr<unsigned char> take(std::size_t bytes) {
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (std::size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].bytes == bytes) {
          data = free_[i].data;
          free_[i] = free_.back();
          free_.pop_back();
          break;
        }
      }
    }
    if (data == nullptr) {
      data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      if (data == nullptr) throw std::bad_alloc();
    }
    std::shared_ptr<OutputPool> self = shared_from_this();
    return std::shared_ptr<unsigned char>(
        static_cast<unsigned char*>(data),
        [self, bytes](unsigned char* p) { self->give_back(p, bytes); });
  }

 private:
  struct Block {
    void* data;
    std::size_t bytes;
  };

  void give_back(void* data, std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_.size() < keep_) {
        free_.push_back({data, bytes});
        return;
      }
    }
    std::free(data);
  }

  const std::size_t keep_;
  std::mutex mu_;
  std::vector<Block> free_;
};

struct Ready {
  Decoded batch;
  SamplerState state_after;
  std::exception_ptr error;
};

}  // namespace

struct LoaderEngine::Impl : OutputAllocator {
  std::shared_ptr<Dataset> dataset;
  EngineOptions options;
  std::vector<SampleRead> reads_of_sample;
  DecodeFn decode;
  GlobalSampler sampler;                   // advanced by the reader thread only
  std::vector<std::size_t> element_bytes;  // per read: bytes of one element of its field
  std::shared_ptr<OutputPool> outputs;     // unused with pin_memory (CUDA's host allocator caches)
  std::vector<std::int64_t> shard_offsets;

  mutable std::mutex mu;
  std::condition_variable reader_cv, worker_cv, consumer_cv;
  std::deque<RawBatch> work;
  std::map<std::int64_t, Ready> ready;
  std::vector<std::vector<unsigned char>> spare_buffers;  // reused staging memory
  int in_flight = 0;                                      // read but not yet returned by next()
  bool reader_waiting = false;                            // for room to read ahead
  bool stop = false;
  std::int64_t next_seq = 0;
  SamplerState delivered;
  LoaderStats stats;
  std::thread reader;
  std::vector<std::thread> workers;
  // Reader thread only: the chunk cache. tables[read * shards + shard], and
  // an LRU list through the cached slots.
  std::vector<ChunkTable> tables;
  ChunkSlot* lru_newest = nullptr;
  ChunkSlot* lru_oldest = nullptr;
  std::size_t cache_used = 0;
  std::int64_t reads = 0, hits = 0;  // flushed into stats per batch

  Impl(std::shared_ptr<Dataset> ds, EngineOptions opt, std::vector<SampleRead> r,
       std::vector<std::int64_t> sampler_shard_sizes, DecodeFn fn, int dp_rank, int dp_size)
      : dataset(std::move(ds)),
        options(std::move(opt)),
        reads_of_sample(std::move(r)),
        decode(std::move(fn)),
        sampler(std::move(sampler_shard_sizes), options.sampler, dp_rank, dp_size) {}

  // Tensors for one batch: pinned from CUDA's caching host allocator, or one
  // recycled block from `outputs` with each tensor 64-byte aligned in it.
  std::vector<at::Tensor> allocate(const std::vector<Spec>& specs) override {
    std::vector<at::Tensor> out;
    if (options.pin_memory) {
      for (const Spec& s : specs) {
        out.push_back(at::empty(s.shape, at::TensorOptions().dtype(s.type).pinned_memory(true)));
      }
      return out;
    }
    std::vector<std::size_t> at_byte;
    std::size_t bytes = 0;
    for (const Spec& s : specs) {
      std::size_t n = at::elementSize(s.type);
      for (std::int64_t d : s.shape) n *= static_cast<std::size_t>(d);
      at_byte.push_back(bytes);
      bytes += (n + 63) / 64 * 64;
    }
    std::shared_ptr<unsigned char> block = outputs->take(bytes + 64);
    const auto release = [block](void*) {};  // each tensor holds the block
    for (std::size_t i = 0; i < specs.size(); ++i) {
      out.push_back(at::from_blob(block.get() + at_byte[i], specs[i].shape, release,
                                  at::TensorOptions().dtype(specs[i].type)));
    }
    return out;
  }

  void build_chunk_tables() {
    const int shards = static_cast<int>(shard_offsets.size()) - 1;
    for (const SampleRead& r : reads_of_sample) {
      for (int shard = 0; shard < shards; ++shard) {
        ChunkTable t;
        t.field = r.field;
        t.shard_begin = shard_offsets[shard];
        t.shard_samples = shard_offsets[shard + 1] - t.shard_begin;
        t.chunk_len = std::max<std::int64_t>(1, dataset->chunk_samples(r.field, shard));
        t.sample_bytes = dataset->manifest().fields[r.field].bytes_per_sample();
        t.slots.resize(static_cast<std::size_t>((t.shard_samples + t.chunk_len - 1) / t.chunk_len));
        tables.push_back(std::move(t));
      }
    }
  }

  std::vector<unsigned char> take_buffer(std::size_t bytes) {
    std::vector<unsigned char> b;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!spare_buffers.empty()) {
        b = std::move(spare_buffers.back());
        spare_buffers.pop_back();
      }
    }
    b.resize(bytes);
    return b;
  }

  void lru_unlink(ChunkSlot& s) {
    (s.newer ? s.newer->older : lru_newest) = s.older;
    (s.older ? s.older->newer : lru_oldest) = s.newer;
    s.newer = s.older = nullptr;
  }

  void lru_push_newest(ChunkSlot& s) {
    s.newer = nullptr;
    s.older = lru_newest;
    (lru_newest ? lru_newest->newer : lru_oldest) = &s;
    lru_newest = &s;
  }

  // First use of chunk `number` by batch `raw`: from the cache (moved to the
  // LRU front) or read whole; either way `raw` shares ownership of it, so
  // evicting it later frees nothing a worker still reads.
  void use_chunk(ChunkTable& t, std::int64_t number, RawBatch& raw) {
    ChunkSlot& s = t.slots[static_cast<std::size_t>(number)];
    if (s.data) {
      ++hits;
      if (lru_newest != &s) {
        lru_unlink(s);
        lru_push_newest(s);
      }
    } else {
      const std::int64_t begin = number * t.chunk_len;
      const std::int64_t count = std::min(t.chunk_len, t.shard_samples - begin);
      const std::size_t bytes = static_cast<std::size_t>(count) * t.sample_bytes;
      std::shared_ptr<unsigned char[]> data(new unsigned char[bytes]);
      dataset->read(t.field, t.shard_begin + begin, count, data.get());
      ++reads;
      s.data = std::move(data);
      s.bytes = bytes;
      cache_used += bytes;
      lru_push_newest(s);
      while (cache_used > options.cache_bytes && lru_oldest != lru_newest) {
        ChunkSlot& victim = *lru_oldest;
        lru_unlink(victim);
        cache_used -= victim.bytes;
        victim.data.reset();  // batches that use it still hold it
      }
    }
    s.stamp = raw.seq;
    s.pinned = s.data.get();
    raw.chunks.push_back(s.data);
  }

  // The shard holding element `element` (of any field: all share the shards).
  int shard_index(std::int64_t element) const {
    return static_cast<int>(std::upper_bound(shard_offsets.begin(), shard_offsets.end(), element) -
                            shard_offsets.begin()) -
           1;
  }

  // Throws unless sample `index` reads only elements inside the data set.
  void check_span(std::int64_t index, const SampleRead& read) const {
    DTRAIN_CHECK(index >= 0 && index * read.stride + read.length <= shard_offsets.back(),
                 "sample index ", index, " reads elements [", index * read.stride, ", ",
                 index * read.stride + read.length, ") of field '",
                 dataset->manifest().fields[read.field].name, "', outside the data set's ",
                 shard_offsets.back());
  }

  // With the cache: the bytes of elements [first, first + count) of read
  // `r`. A span inside one chunk (every image, nearly every token window) is
  // a pointer into the cached chunk; one that crosses a chunk or shard
  // boundary is copied together into a spill buffer that the batch owns.
  const unsigned char* span_data(std::size_t r, std::int64_t first, std::int64_t count,
                                 RawBatch& raw) {
    const std::size_t shards = shard_offsets.size() - 1;
    // Element `element`'s bytes; `available`: elements from there to its chunk's end.
    auto piece = [&](std::int64_t element, std::int64_t& available) {
      const auto shard = static_cast<std::size_t>(shard_index(element));
      ChunkTable& t = tables[r * shards + shard];
      const std::int64_t offset = element - t.shard_begin;
      const std::int64_t number = offset / t.chunk_len;
      const ChunkSlot& s = t.slots[static_cast<std::size_t>(number)];
      if (s.stamp != raw.seq) use_chunk(t, number, raw);
      const std::int64_t within = offset - number * t.chunk_len;
      available = std::min(t.chunk_len, t.shard_samples - number * t.chunk_len) - within;
      return s.pinned + static_cast<std::size_t>(within) * t.sample_bytes;
    };
    std::int64_t available = 0;
    const unsigned char* head = piece(first, available);
    if (available >= count) return head;
    const std::size_t bytes = element_bytes[r];
    std::unique_ptr<unsigned char[]> joined(
        new unsigned char[static_cast<std::size_t>(count) * bytes]);
    for (std::int64_t done = 0;;) {
      const std::int64_t n = std::min(available, count - done);
      std::memcpy(joined.get() + static_cast<std::size_t>(done) * bytes, head,
                  static_cast<std::size_t>(n) * bytes);
      done += n;
      if (done == count) break;
      head = piece(first + done, available);
    }
    raw.spill.push_back(std::move(joined));
    return raw.spill.back().get();
  }

  // With the cache: every chunk the batch needs is made resident (one HDF5
  // read per missing chunk, the LRU touched once per chunk per batch) and
  // each sample's span becomes a pointer into its chunk, in sampler order.
  void read_cached(RawBatch& raw) {
    const std::size_t n = raw.indices.size();
    raw.data.assign(reads_of_sample.size(), std::vector<const unsigned char*>(n));
    for (std::size_t i = 0; i < n; ++i) {
      const std::int64_t index = raw.indices[i];
      for (std::size_t r = 0; r < reads_of_sample.size(); ++r) {
        const SampleRead& read = reads_of_sample[r];
        check_span(index, read);
        raw.data[r][i] = span_data(r, index * read.stride, read.length, raw);
      }
    }
  }

  // Elements [first, end) of `read`'s field into `dst`: one HDF5 read per
  // shard the range touches.
  void read_range(const SampleRead& read, std::size_t bytes, std::int64_t first, std::int64_t end,
                  unsigned char* dst) {
    while (first < end) {
      const std::int64_t stop = std::min(end, shard_offsets[shard_index(first) + 1]);
      dataset->read(read.field, first, stop - first, dst);
      ++reads;
      dst += static_cast<std::size_t>(stop - first) * bytes;
      first = stop;
    }
  }

  // Without the cache: per read, the samples' spans in sorted order, those
  // that overlap or adjoin coalesced into runs (for images: contiguous
  // indices), each run read with one HDF5 read per shard into the staging
  // buffer.
  void read_staged(RawBatch& raw) {
    const auto n = static_cast<std::int64_t>(raw.indices.size());
    std::vector<std::int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), std::int64_t{0});
    std::sort(order.begin(), order.end(),
              [&](std::int64_t a, std::int64_t b) { return raw.indices[a] < raw.indices[b]; });
    raw.data.assign(reads_of_sample.size(), std::vector<const unsigned char*>(order.size()));
    raw.staging.resize(reads_of_sample.size());
    for (std::size_t r = 0; r < reads_of_sample.size(); ++r) {
      const SampleRead& read = reads_of_sample[r];
      const std::size_t bytes = element_bytes[r];
      raw.staging[r] = take_buffer(static_cast<std::size_t>(n * read.length) * bytes);
      unsigned char* next_free = raw.staging[r].data();
      std::int64_t run_first = 0, run_end = 0;
      unsigned char* run_dst = nullptr;
      for (const std::int64_t i : order) {
        const std::int64_t index = raw.indices[i];
        check_span(index, read);
        const std::int64_t first = index * read.stride, end = first + read.length;
        if (run_dst == nullptr || first > run_end) {
          if (run_dst != nullptr) read_range(read, bytes, run_first, run_end, run_dst);
          run_first = first;
          run_end = end;
          run_dst = next_free;
          next_free += static_cast<std::size_t>(end - first) * bytes;
        } else if (end > run_end) {
          next_free += static_cast<std::size_t>(end - run_end) * bytes;
          run_end = end;
        }
        raw.data[r][static_cast<std::size_t>(i)] =
            run_dst + static_cast<std::size_t>(first - run_first) * bytes;
      }
      if (run_dst != nullptr) read_range(read, bytes, run_first, run_end, run_dst);
    }
  }

  void read_batch(RawBatch& raw) {
    const auto start = Clock::now();
    reads = hits = 0;
    if (options.cache_bytes > 0) {
      read_cached(raw);
    } else {
      read_staged(raw);
    }
    std::lock_guard<std::mutex> lock(mu);
    stats.read_seconds += seconds_since(start);
    stats.hyperslab_reads += reads;
    stats.cache_hits += hits;
    ++stats.batches_read;
  }

  void reader_loop() {
    for (std::int64_t seq = 0;; ++seq) {
      {
        // With prefetch_depth batches in flight, sleep until half of them are
        // taken, then read ahead in a burst: one wake-up per depth/2 batches.
        std::unique_lock<std::mutex> lock(mu);
        if (!stop && in_flight >= options.prefetch_depth) {
          reader_waiting = true;
          reader_cv.wait(lock, [&] { return stop || in_flight <= options.prefetch_depth / 2; });
          reader_waiting = false;
        }
        if (stop) return;
      }
      RawBatch raw;
      raw.seq = seq;
      try {
        const SamplerState before = sampler.state();
        raw.epoch = before.epoch;
        raw.batch_in_epoch = before.consumed_samples / sampler.global_batch_size();
        raw.indices = sampler.next();
        raw.state_after = sampler.state();
        read_batch(raw);
      } catch (...) {
        raw.error = std::current_exception();
      }
      const bool failed = raw.error != nullptr;
      {
        std::lock_guard<std::mutex> lock(mu);
        ++in_flight;
        work.push_back(std::move(raw));
      }
      worker_cv.notify_one();
      if (failed) return;  // the error reaches next(); nothing after it is read
    }
  }

  void worker_loop() {
    for (;;) {
      RawBatch raw;
      {
        std::unique_lock<std::mutex> lock(mu);
        worker_cv.wait(lock, [&] { return stop || !work.empty(); });
        if (stop) return;
        raw = std::move(work.front());
        work.pop_front();
      }
      Ready done;
      done.state_after = raw.state_after;
      done.error = raw.error;
      const auto start = Clock::now();
      if (!done.error) {
        try {
          done.batch.tensors = decode(raw, *this);
          done.batch.epoch = raw.epoch;
          done.batch.batch_in_epoch = raw.batch_in_epoch;
        } catch (...) {
          done.error = std::current_exception();
        }
      }
      raw.chunks.clear();  // evicted chunks are freed here, outside the lock
      raw.spill.clear();
      bool wake_consumer = false;
      {
        std::lock_guard<std::mutex> lock(mu);
        stats.decode_seconds += seconds_since(start);
        for (auto& buffer : raw.staging) {
          if (buffer.capacity() > 0) spare_buffers.push_back(std::move(buffer));
        }
        ready.emplace(raw.seq, std::move(done));
        wake_consumer = raw.seq == next_seq;  // next() waits for that batch only
      }
      if (wake_consumer) consumer_cv.notify_all();
    }
  }
};

LoaderEngine::LoaderEngine(std::shared_ptr<Dataset> dataset, EngineOptions options,
                           std::vector<SampleRead> reads,
                           std::vector<std::int64_t> sampler_shard_sizes, DecodeFn decode,
                           int dp_rank, int dp_size) {
  DTRAIN_CHECK_ARG(dataset != nullptr, "a loader needs a dataset");
  DTRAIN_CHECK_ARG(options.workers >= 1, "workers must be >= 1, got ", options.workers);
  DTRAIN_CHECK_ARG(options.prefetch_depth >= 1, "prefetch_depth must be >= 1, got ",
                   options.prefetch_depth);
  impl_ =
      std::make_unique<Impl>(std::move(dataset), std::move(options), std::move(reads),
                             std::move(sampler_shard_sizes), std::move(decode), dp_rank, dp_size);
  Impl& s = *impl_;
  s.sampler.restore(s.options.start);
  s.delivered = s.options.start;
  s.shard_offsets = s.dataset->shard_offsets();
  for (const SampleRead& r : s.reads_of_sample) {
    DTRAIN_CHECK_ARG(
        r.field >= 0 && r.field < static_cast<int>(s.dataset->manifest().fields.size()) &&
            r.stride >= 0 && r.length >= 1,
        "bad sample read (field ", r.field, ", stride ", r.stride, ", length ", r.length, ")");
    s.element_bytes.push_back(s.dataset->manifest().fields[r.field].bytes_per_sample());
  }
  s.outputs = std::make_shared<OutputPool>(
      static_cast<std::size_t>(s.options.prefetch_depth + s.options.workers + 2));
  if (s.options.cache_bytes > 0) s.build_chunk_tables();
  s.reader = std::thread([&s] { s.reader_loop(); });
  for (int w = 0; w < s.options.workers; ++w) s.workers.emplace_back([&s] { s.worker_loop(); });
}

LoaderEngine::~LoaderEngine() {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.stop = true;
  }
  s.reader_cv.notify_all();
  s.worker_cv.notify_all();
  s.consumer_cv.notify_all();
  if (s.reader.joinable()) s.reader.join();
  for (auto& w : s.workers) w.join();
}

Decoded LoaderEngine::next() {
  Impl& s = *impl_;
  Ready done;
  bool wake_reader = false;
  {
    std::unique_lock<std::mutex> lock(s.mu);
    s.consumer_cv.wait(lock, [&] { return s.ready.count(s.next_seq) > 0; });
    auto it = s.ready.find(s.next_seq);
    // An error ends the stream: it stays queued, so every later call rethrows it.
    if (it->second.error) std::rethrow_exception(it->second.error);
    done = std::move(it->second);
    s.ready.erase(it);
    ++s.next_seq;
    --s.in_flight;
    s.delivered = done.state_after;
    wake_reader = s.reader_waiting && s.in_flight <= s.options.prefetch_depth / 2;
  }
  if (wake_reader) s.reader_cv.notify_one();
  return std::move(done.batch);
}

SamplerState LoaderEngine::state() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->delivered;
}

std::int64_t LoaderEngine::batches_per_epoch() const { return impl_->sampler.batches_per_epoch(); }

LoaderStats LoaderEngine::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

}  // namespace dtrain::data::detail
