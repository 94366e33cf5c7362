// A small, strict JSON reader for config files and safetensors headers (RFC 8259: no comments,
// no trailing commas, no NaN). Errors throw mc::Error(kCheckpoint) naming the byte offset.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace mc {

class Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  static Json parse(const std::string& text);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  // Typed accessors throw kCheckpoint when the value has another type; `what` names the value
  // in the message (e.g. "config field 'hidden_size'").
  double number(const std::string& what) const;
  int64_t integer(const std::string& what) const;  // a number with no fractional part
  bool boolean(const std::string& what) const;
  const std::string& string(const std::string& what) const;
  const std::vector<Json>& array(const std::string& what) const;
  const std::map<std::string, Json>& object(const std::string& what) const;

  // Object member or nullptr when absent (or when this is not an object).
  const Json* find(const std::string& key) const;

  static const char* type_name(Type type);

 private:
  friend class JsonParser;
  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<Json> array_;
  std::map<std::string, Json> object_;
};

}  // namespace mc
