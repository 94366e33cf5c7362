// Overflow-checked products for sizes that come from files, configs or callers: element
// counts, byte sizes, pool sizes. A wrapped product is how a crafted shape turns into a tiny
// allocation and a huge write, so every such size is computed here.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

namespace mc {

// The product of non-negative factors; nullopt when a factor is negative or the product
// overflows int64.
inline std::optional<int64_t> checked_product(std::initializer_list<int64_t> factors) {
  int64_t product = 1;
  for (int64_t factor : factors)
    if (factor < 0 || __builtin_mul_overflow(product, factor, &product)) return std::nullopt;
  return product;
}

inline std::optional<int64_t> checked_product(const std::vector<int64_t>& factors) {
  int64_t product = 1;
  for (int64_t factor : factors)
    if (factor < 0 || __builtin_mul_overflow(product, factor, &product)) return std::nullopt;
  return product;
}

}  // namespace mc
