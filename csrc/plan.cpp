// Bin planning: best-fit-decreasing over a capacity-indexed tree (O(n + L + n log_64 L) for budget
// L) and first-fit over shuffled input with a max-tree over bins (O(n log n)). Neither allocates
// per item; both are single-threaded, so the plan cannot depend on a thread count.
#include <algorithm>
#include <string>

#include "packing.h"

namespace refit_packing {
namespace {

// Index of the lowest set bit; w != 0.
inline int ctz64(uint64_t w) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctzll(w);
#else
  int k = 0;
  while (!(w & 1)) {
    w >>= 1;
    ++k;
  }
  return k;
#endif
}

// Set of remaining capacities 0..universe-1 that at least one open bin has: a segment tree with
// fan-out 64 whose nodes are bit masks (bit set = subtree non-empty). Fan-out 64 keeps it at two
// levels for max_tokens <= 4095 and three up to 262143, so "smallest capacity >= s" costs a few
// word operations instead of a dozen pointer-chasing binary steps.
class CapacityTree {
 public:
  explicit CapacityTree(int64_t universe) {
    int64_t n = universe;
    do {
      n = (n + 63) >> 6;
      levels_.emplace_back(static_cast<size_t>(n), 0);
    } while (n > 1);
  }

  void insert(int64_t c) {
    for (auto& lv : levels_) {
      uint64_t& w = lv[c >> 6];
      const bool was_empty = (w == 0);
      w |= 1ULL << (c & 63);
      if (!was_empty) return;  // the parents already know this subtree is non-empty
      c >>= 6;
    }
  }

  void erase(int64_t c) {
    for (auto& lv : levels_) {
      uint64_t& w = lv[c >> 6];
      w &= ~(1ULL << (c & 63));
      if (w != 0) return;  // subtree still non-empty: parents unchanged
      c >>= 6;
    }
  }

  // Smallest member >= c, or -1.
  int64_t next_at_least(int64_t c) const {
    size_t lvl = 0;
    for (;;) {  // climb until some word has a set bit at or after c
      if (lvl == levels_.size()) return -1;
      const auto& lv = levels_[lvl];
      const int64_t wi = c >> 6;
      if (wi >= static_cast<int64_t>(lv.size())) return -1;
      const uint64_t w = lv[wi] & (~0ULL << (c & 63));
      if (w) {
        c = (wi << 6) + ctz64(w);
        break;
      }
      c = wi + 1;
      ++lvl;
    }
    while (lvl > 0) {  // descend along the leftmost non-empty child
      --lvl;
      c = (c << 6) + ctz64(levels_[lvl][c]);
    }
    return c;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// Turns "bin of each item, in placement order" into CSR with the bins in shuffled order. Items keep
// their placement order inside a bin (for BFD: decreasing length).
Plan to_shuffled_csr(const std::vector<int64_t>& placed_items, const std::vector<int64_t>& bin_of,
                     int64_t n_bins, SplitMix64& rng) {
  std::vector<int64_t> perm(static_cast<size_t>(n_bins));
  for (int64_t b = 0; b < n_bins; ++b) perm[b] = b;
  // Sorted-by-fill order would feed the model all the long conversations first; shuffle the bins.
  shuffle_in_place(perm.data(), n_bins, rng);

  std::vector<int64_t> count(static_cast<size_t>(n_bins), 0);
  for (int64_t b : bin_of) ++count[b];
  Plan plan;
  plan.bin_offsets.resize(static_cast<size_t>(n_bins) + 1);
  std::vector<int64_t> cursor(static_cast<size_t>(n_bins));
  int64_t acc = 0;
  for (int64_t k = 0; k < n_bins; ++k) {
    plan.bin_offsets[k] = acc;
    cursor[perm[k]] = acc;
    acc += count[perm[k]];
  }
  plan.bin_offsets[n_bins] = acc;
  plan.items.resize(placed_items.size());
  for (size_t p = 0; p < placed_items.size(); ++p) plan.items[cursor[bin_of[p]]++] = placed_items[p];
  return plan;
}

Plan plan_bfd(const int64_t* lengths, int64_t n, int64_t cap, SplitMix64& rng) {
  // Counting sort by decreasing length (lengths are bounded by cap), ties by increasing index:
  // O(n + cap) and stable, so the plan is a pure function of the input.
  std::vector<int64_t> start(static_cast<size_t>(cap) + 2, 0);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] <= cap) {
      ++start[lengths[i]];
      ++m;
    }
  }
  int64_t acc = 0;
  for (int64_t c = cap; c >= 1; --c) {
    const int64_t k = start[c];
    start[c] = acc;
    acc += k;
  }
  std::vector<int64_t> order(static_cast<size_t>(m));
  for (int64_t i = 0; i < n; ++i)
    if (lengths[i] <= cap) order[start[lengths[i]]++] = i;

  // Open bins grouped by remaining capacity: head[c] starts an intrusive stack of bins (linked by
  // next_bin) that have exactly c tokens left. Ties between equal capacities go to the bin that
  // reached that capacity last (top of the stack): any tie rule gives the same loads, this one is O(1).
  CapacityTree tree(cap + 1);
  std::vector<int64_t> head(static_cast<size_t>(cap) + 1, -1);
  std::vector<int64_t> next_bin;
  next_bin.reserve(static_cast<size_t>(m / 4 + 16));
  std::vector<int64_t> bin_of(static_cast<size_t>(m));
  int64_t n_bins = 0;
  for (int64_t p = 0; p < m; ++p) {
    const int64_t s = lengths[order[p]];
    const int64_t c = tree.next_at_least(s);
    int64_t b, left;
    if (c < 0) {
      b = n_bins++;
      next_bin.push_back(-1);
      left = cap - s;
    } else {
      b = head[c];
      head[c] = next_bin[b];
      if (head[c] < 0) tree.erase(c);
      left = c - s;
    }
    bin_of[p] = b;
    if (left > 0) {  // full bins never come back, so they are not tracked
      if (head[left] < 0) tree.insert(left);
      next_bin[b] = head[left];
      head[left] = b;
    }
  }
  return to_shuffled_csr(order, bin_of, n_bins, rng);
}

template <class V>
Plan plan_ffs(const int64_t* lengths, int64_t n, int64_t cap, SplitMix64& rng) {
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    if (lengths[i] <= cap) order.push_back(i);
  const int64_t m = static_cast<int64_t>(order.size());
  shuffle_in_place(order.data(), m, rng);

  // Max-tree over bin slots 0..size-1 of remaining capacity. Unopened slots hold cap, so "leftmost
  // slot with room" is first fit over open bins, or the next new bin; m items never need > m slots.
  int64_t size = 1;
  while (size < std::max<int64_t>(m, 1)) size <<= 1;
  // V = int32_t whenever capacities fit: half the bytes for a tree walked top to bottom per item.
  std::vector<V> tree(static_cast<size_t>(2 * size), static_cast<V>(cap));
  std::vector<int64_t> bin_of(static_cast<size_t>(m));
  int64_t n_bins = 0;
  for (int64_t p = 0; p < m; ++p) {
    const V s = static_cast<V>(lengths[order[p]]);
    int64_t node = 1;
    while (node < size) node = 2 * node + (tree[2 * node] < s ? 1 : 0);
    const int64_t b = node - size;
    if (b >= n_bins) n_bins = b + 1;
    bin_of[p] = b;
    tree[node] -= s;
    for (node >>= 1; node >= 1; node >>= 1) {
      const V v = std::max(tree[2 * node], tree[2 * node + 1]);
      if (tree[node] == v) break;  // ancestors unchanged
      tree[node] = v;
    }
  }
  return to_shuffled_csr(order, bin_of, n_bins, rng);
}

}  // namespace

Plan plan_bins(const int64_t* lengths, int64_t n, int64_t max_tokens, Strategy strategy,
               uint64_t seed) {
  if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1, got " + std::to_string(max_tokens));
  // BFD keeps O(max_tokens) tables (counting sort, one stack head per capacity): bound them.
  if (max_tokens > kMaxTokensLimit)
    throw std::invalid_argument("max_tokens must be <= " + std::to_string(kMaxTokensLimit) + ", got " +
                                std::to_string(max_tokens));
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 1)
      throw std::invalid_argument("conversation " + std::to_string(i) + " has length " +
                                  std::to_string(lengths[i]) + " (must be >= 1)");
  }
  SplitMix64 rng(seed);
  switch (strategy) {
    case Strategy::kBestFitDecreasing:
      return plan_bfd(lengths, n, max_tokens, rng);
    case Strategy::kFirstFitShuffle:
      if (max_tokens <= INT32_MAX) return plan_ffs<int32_t>(lengths, n, max_tokens, rng);
      return plan_ffs<int64_t>(lengths, n, max_tokens, rng);
  }
  throw std::invalid_argument("unknown strategy");
}

}  // namespace refit_packing
