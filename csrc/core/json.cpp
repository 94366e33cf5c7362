#include "core/json.h"

#include <cmath>
#include <cstdlib>

#include "core/error.h"

namespace mc {

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : text_(text) {}

  Json parse_document() {
    Json value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) error("unexpected trailing characters");
    return value;
  }

 private:
  static constexpr int kMaxDepth = 256;  // deeper nesting is an attack, not a checkpoint

  [[noreturn]] void error(const std::string& what) const {
    fail(ErrorKind::kCheckpoint, "invalid JSON at byte ", pos_, ": ", what);
  }

  void skip_space() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' || text_[pos_] == '\t'))
      ++pos_;
  }

  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

  void expect_word(const char* word) {
    for (const char* c = word; *c; ++c, ++pos_)
      if (pos_ >= text_.size() || text_[pos_] != *c) error(std::string("expected '") + word + "'");
  }

  Json parse_value(int depth) {
    if (depth > kMaxDepth) error("nesting too deep");
    skip_space();
    Json value;
    char c = peek();
    if (c == '{') {
      value.type_ = Json::Type::kObject;
      ++pos_;
      skip_space();
      if (peek() == '}') {
        ++pos_;
        return value;
      }
      while (true) {
        skip_space();
        if (peek() != '"') error("expected a string key");
        std::string key = parse_string();
        skip_space();
        if (peek() != ':') error("expected ':'");
        ++pos_;
        if (value.object_.count(key)) error("duplicate key '" + key + "'");
        value.object_.emplace(std::move(key), parse_value(depth + 1));
        skip_space();
        if (peek() == ',') {
          ++pos_;
          continue;
        }
        if (peek() == '}') {
          ++pos_;
          return value;
        }
        error("expected ',' or '}'");
      }
    }
    if (c == '[') {
      value.type_ = Json::Type::kArray;
      ++pos_;
      skip_space();
      if (peek() == ']') {
        ++pos_;
        return value;
      }
      while (true) {
        value.array_.push_back(parse_value(depth + 1));
        skip_space();
        if (peek() == ',') {
          ++pos_;
          continue;
        }
        if (peek() == ']') {
          ++pos_;
          return value;
        }
        error("expected ',' or ']'");
      }
    }
    if (c == '"') {
      value.type_ = Json::Type::kString;
      value.string_ = parse_string();
      return value;
    }
    if (c == 't') {
      expect_word("true");
      value.type_ = Json::Type::kBool;
      value.bool_ = true;
      return value;
    }
    if (c == 'f') {
      expect_word("false");
      value.type_ = Json::Type::kBool;
      return value;
    }
    if (c == 'n') {
      expect_word("null");
      return value;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
      value.type_ = Json::Type::kNumber;
      value.number_ = parse_number();
      return value;
    }
    error(c == '\0' ? "unexpected end of input" : std::string("unexpected character '") + c + "'");
  }

  double parse_number() {
    size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++pos_;
    } else {
      error("malformed number");
    }
    if (peek() == '.') {
      ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) error("malformed number");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) error("malformed number");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    std::string token = text_.substr(start, pos_ - start);
    return std::strtod(token.c_str(), nullptr);
  }

  unsigned parse_hex4() {
    unsigned code = 0;
    for (int i = 0; i < 4; ++i, ++pos_) {
      char c = peek();
      code <<= 4;
      if (c >= '0' && c <= '9') code |= c - '0';
      else if (c >= 'a' && c <= 'f') code |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') code |= c - 'A' + 10;
      else error("bad \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xc0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xe0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    }
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) error("unterminated string");
      char c = text_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      char escape = peek();
      ++pos_;
      switch (escape) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = parse_hex4();
          if (code >= 0xd800 && code < 0xdc00) {
            // A high surrogate must be followed by a low one: together they name one code point.
            if (peek() != '\\') error("unpaired surrogate");
            ++pos_;
            if (peek() != 'u') error("unpaired surrogate");
            ++pos_;
            unsigned low = parse_hex4();
            if (low < 0xdc00 || low >= 0xe000) error("unpaired surrogate");
            code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
          } else if (code >= 0xdc00 && code < 0xe000) {
            error("unpaired surrogate");
          }
          append_utf8(out, code);
          break;
        }
        default: error("bad escape");
      }
    }
  }

  const std::string& text_;
  size_t pos_ = 0;
};

Json Json::parse(const std::string& text) { return JsonParser(text).parse_document(); }

const char* Json::type_name(Type type) {
  switch (type) {
    case Type::kNull: return "null";
    case Type::kBool: return "a boolean";
    case Type::kNumber: return "a number";
    case Type::kString: return "a string";
    case Type::kArray: return "an array";
    case Type::kObject: return "an object";
  }
  return "?";
}

static void require_type(const Json& value, Json::Type type, const std::string& what) {
  if (value.type() != type)
    fail(ErrorKind::kCheckpoint, what, " must be ", Json::type_name(type), ", got ", Json::type_name(value.type()));
}

double Json::number(const std::string& what) const {
  require_type(*this, Type::kNumber, what);
  return number_;
}

int64_t Json::integer(const std::string& what) const {
  require_type(*this, Type::kNumber, what);
  if (number_ != std::floor(number_)) fail(ErrorKind::kCheckpoint, what, " must be an integer, got ", number_);
  if (std::fabs(number_) > 9007199254740992.0)
    fail(ErrorKind::kCheckpoint, what, " is too large: ", number_, " is past 2^53, where doubles stop being exact integers");
  return static_cast<int64_t>(number_);
}

bool Json::boolean(const std::string& what) const {
  require_type(*this, Type::kBool, what);
  return bool_;
}

const std::string& Json::string(const std::string& what) const {
  require_type(*this, Type::kString, what);
  return string_;
}

const std::vector<Json>& Json::array(const std::string& what) const {
  require_type(*this, Type::kArray, what);
  return array_;
}

const std::map<std::string, Json>& Json::object(const std::string& what) const {
  require_type(*this, Type::kObject, what);
  return object_;
}

const Json* Json::find(const std::string& key) const {
  if (type_ != Type::kObject) return nullptr;
  auto it = object_.find(key);
  return it == object_.end() ? nullptr : &it->second;
}

}  // namespace mc
