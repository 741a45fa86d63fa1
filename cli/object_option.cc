// --object (object_option.h): qemu's keyval syntax, the secret object and
// its loading, with QEMU 7.2's checks in QEMU's order.
#include "object_option.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>
#include <vector>

#include "cli_common.h"

namespace dmcow::cli {
namespace {

// QEMU's other user-creatable types (qemu-img --object help): named so that
// their refusal says they are QEMU's, not misspelt.
const std::set<std::string> kOtherQemuTypes = {
    "authz-list",        "authz-list-file", "authz-pam",      "authz-simple",   "main-loop",
    "pr-manager-helper", "secret_keyring",  "thread-context", "throttle-group", "tls-cipher-suites",
    "tls-creds-anon",    "tls-creds-psk",   "tls-creds-x509", "iothread"};
const char* const kSecretProperties[] = {"data", "file", "format", "iv", "keyid"};
constexpr size_t kMaxSecretFileBytes = 64 << 20;  // a key or passphrase file; bounds the read
constexpr size_t kAesKeyBytes = 32;
constexpr size_t kAesBlockBytes = 16;

std::map<std::string, std::string>& Secrets() {
  static std::map<std::string, std::string> secrets;
  return secrets;
}

// One --object value: its properties in command-line order (a repeated key
// keeps its last value, in its first place), and whether help was asked.
struct ObjectArgs {
  std::vector<std::pair<std::string, std::string>> props;
  bool help = false;

  void Set(const std::string& key, const std::string& value) {
    for (auto& [k, v] : props) {
      if (k == key) {
        v = value;
        return;
      }
    }
    props.emplace_back(key, value);
  }
  const std::string* Get(const std::string& key) const {
    for (const auto& [k, v] : props) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

bool IsHelp(const std::string& s) { return s == "help" || s == "?"; }

bool ValidKeyChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
}

// qemu's keyval_parse with "qom-type" as the implied key: the first
// parameter may be a bare value (which ends at the first comma: it cannot
// hold one), later ones are KEY=VALUE with ",," for a comma in VALUE, and a
// bare "help" asks for help.
bool ParseKeyval(const std::string& text, ObjectArgs* out, std::string* error) {
  size_t pos = 0;
  bool first = true;
  while (pos < text.size()) {
    size_t key_end = text.find_first_of("=,", pos);
    if (key_end == std::string::npos) key_end = text.size();
    const std::string key = text.substr(pos, key_end - pos);
    if (key_end == text.size() || text[key_end] == ',') {
      if (first && !key.empty()) {
        if (IsHelp(key)) {
          out->help = true;
        } else {
          out->Set("qom-type", key);
        }
      } else if (IsHelp(key)) {
        out->help = true;
      } else if (key.empty()) {
        *error = "Invalid parameter ''";
        return false;
      } else {
        *error = "Expected '=' after parameter '" + key + "'";
        return false;
      }
      pos = key_end + 1;
      first = false;
      continue;
    }
    if (key.empty() || key.front() == '.' || key.back() == '.') {
      *error = "Invalid parameter '" + key + "'";
      return false;
    }
    for (char c : key) {
      if (!ValidKeyChar(c)) {
        *error = "Invalid parameter '" + key + "'";
        return false;
      }
    }
    std::string value;
    size_t i = key_end + 1;
    for (; i < text.size(); i++) {
      if (text[i] == ',') {
        if (i + 1 < text.size() && text[i + 1] == ',') {
          value += ',';
          i++;
          continue;
        }
        break;
      }
      value += text[i];
    }
    out->Set(key, value);
    pos = i + 1;
    first = false;
  }
  return true;
}

// The JSON form, {"qom-type": "secret", "id": "s0", ...}: every member a string.
bool ParseJson(const std::string& text, ObjectArgs* out, std::string* error) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    *error = "JSON parse error, not a JSON object: " + text;
    return false;
  }
  for (const auto& [key, value] : j.items()) {
    if (key == "loaded") {  // read-only, refused whatever its value (ProcessObjectOption)
      out->Set(key, value.dump());
      continue;
    }
    if (!value.is_string()) {
      *error = "Invalid parameter type for '" + key + "', expected: string";
      return false;
    }
    out->Set(key, value.get<std::string>());
  }
  return true;
}

bool IsIdentifier(const std::string& id) {
  if (id.empty() || !((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z'))) return false;
  for (char c : id) {
    if (!ValidKeyChar(c)) return false;
  }
  return true;
}

// qbase64_decode: only base64's characters, then glib's decoding (a trailing
// partial group is dropped, '=' ends a group early).
bool DecodeBase64(const std::string& in, std::string* out, std::string* error) {
  static const std::string kChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  if (in.find_first_not_of(kChars + "=") != std::string::npos) {
    *error = "Base64 data contains invalid characters";
    return false;
  }
  out->clear();
  uint32_t v = 0;
  int n = 0;
  char last[2] = {0, 0};
  for (char c : in) {
    const size_t rank = c == '=' ? 0 : kChars.find(c);
    last[1] = last[0];
    last[0] = c;
    v = (v << 6) | static_cast<uint32_t>(rank);
    if (++n == 4) {
      out->push_back(static_cast<char>(v >> 16));
      if (last[1] != '=') out->push_back(static_cast<char>(v >> 8));
      if (last[0] != '=') out->push_back(static_cast<char>(v));
      n = 0;
      v = 0;
    }
  }
  return true;
}

// g_file_get_contents, with its words: a pipe (file=/dev/fd/N) is read to its
// end like a file; the size is bounded.
bool ReadSecretFile(const std::string& path, std::string* out, std::string* error) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *error = "Unable to read " + path + ": Failed to open file \u201c" + path + "\u201d: " + std::strerror(errno);
    return false;
  }
  out->clear();
  char buf[65536];
  for (;;) {
    const ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      *error = "Unable to read " + path + ": Error reading file \u201c" + path + "\u201d: " + std::strerror(errno);
      close(fd);
      return false;
    }
    if (n == 0) break;
    if (out->size() + static_cast<size_t>(n) > kMaxSecretFileBytes) {
      *error = "Unable to read " + path + ": larger than " + std::to_string(kMaxSecretFileBytes) + " bytes";
      close(fd);
      return false;
    }
    out->append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return true;
}

// qcrypto_secret_decrypt: AES-256-CBC under the secret `keyid` (32 bytes),
// with a 16-byte base64 IV; the padding's length is the last byte.
bool DecryptSecret(const std::string& id, const std::string& keyid, const std::string* iv_b64, bool base64,
                   const std::string& input, std::string* out, std::string* error) {
  const std::string* key = FindSecret(keyid);
  if (key == nullptr) {
    *error = keyid == id ? "Secret with id '" + keyid + "' has no data" : "No secret with id '" + keyid + "'";
    return false;
  }
  if (key->size() != kAesKeyBytes) {
    *error = "Key should be 32 bytes in length";
    return false;
  }
  if (iv_b64 == nullptr) {
    *error = "IV is required to decrypt secret";
    return false;
  }
  std::string iv;
  if (!DecodeBase64(*iv_b64, &iv, error)) return false;
  if (iv.size() != kAesBlockBytes) {
    *error = "IV should be 16 bytes in length not " + std::to_string(iv.size());
    return false;
  }
  std::string ciphertext = input;
  if (base64 && !DecodeBase64(input, &ciphertext, error)) return false;
  if (ciphertext.size() % kAesBlockBytes != 0) {
    *error = "Length " + std::to_string(ciphertext.size()) + " must be a multiple of block size 16";
    return false;
  }
  std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)> ctx(EVP_CIPHER_CTX_new(), EVP_CIPHER_CTX_free);
  std::string plain(ciphertext.size(), '\0');
  int len = 0;
  if (!ctx ||
      EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_cbc(), nullptr, reinterpret_cast<const unsigned char*>(key->data()),
                         reinterpret_cast<const unsigned char*>(iv.data())) != 1 ||
      EVP_CIPHER_CTX_set_padding(ctx.get(), 0) != 1 ||
      EVP_DecryptUpdate(ctx.get(), reinterpret_cast<unsigned char*>(plain.data()), &len,
                        reinterpret_cast<const unsigned char*>(ciphertext.data()),
                        static_cast<int>(ciphertext.size())) != 1) {
    *error = "Cannot decrypt secret '" + id + "' (libcrypto)";
    return false;
  }
  const unsigned pad = plain.empty() ? 0 : static_cast<unsigned char>(plain.back());
  if (plain.empty() || pad > kAesBlockBytes || pad > plain.size()) {
    *error = "Incorrect number of padding bytes (" + std::to_string(pad) + ") found on decrypted data";
    return false;
  }
  plain.resize(plain.size() - pad);
  *out = std::move(plain);
  return true;
}

// Creates a secret object from its checked properties.
bool CreateSecret(const ObjectArgs& args, const std::string& id, std::string* error) {
  const std::string* data = args.Get("data");
  const std::string* file = args.Get("file");
  const std::string* format = args.Get("format");
  const std::string* keyid = args.Get("keyid");
  const bool base64 = format != nullptr && *format == "base64";
  if (data != nullptr && file != nullptr) {
    *error = "'file' and 'data' are mutually exclusive";
    return false;
  }
  if (data == nullptr && file == nullptr) {
    *error = "Either 'file' or 'data' must be provided";
    return false;
  }
  std::string input;
  if (data != nullptr) {
    input = *data;
  } else if (!ReadSecretFile(*file, &input, error)) {
    return false;
  }
  std::string secret;
  if (keyid != nullptr) {
    if (!DecryptSecret(id, *keyid, args.Get("iv"), base64, input, &secret, error)) return false;
  } else if (base64) {
    if (!DecodeBase64(input, &secret, error)) return false;
  } else {
    secret = std::move(input);
  }
  Secrets()[id] = std::move(secret);
  return true;
}

void PrintTypeHelp(const std::string& type) {
  if (type == "secret") {
    std::printf("secret options:\n");
    for (const char* p : kSecretProperties) {
      std::printf("  %s=<%s>\n", p, std::strcmp(p, "format") == 0 ? "QCryptoSecretFormat" : "string");
    }
  } else {
    std::printf("List of user creatable objects:\n  secret\n");
  }
}

}  // namespace

const std::string* FindSecret(const std::string& id) {
  auto it = Secrets().find(id);
  return it == Secrets().end() ? nullptr : &it->second;
}

std::optional<int> ProcessObjectOption(const std::string& value) {
  ObjectArgs args;
  std::string error;
  const bool parsed =
      !value.empty() && value[0] == '{' ? ParseJson(value, &args, &error) : ParseKeyval(value, &args, &error);
  auto fail = [](const std::string& msg) {
    PrintError(msg);
    return 1;
  };
  if (!parsed) return fail(error);
  const std::string* type = args.Get("qom-type");
  if (args.help && (type == nullptr || type->empty())) {
    PrintTypeHelp("");
    return 0;
  }
  if (type == nullptr) return fail("Parameter 'qom-type' is missing");
  if (IsHelp(*type)) {
    PrintTypeHelp("");
    return 0;
  }
  if (*type != "secret") {
    if (kOtherQemuTypes.count(*type) != 0) return fail("Object type '" + *type + "' is not supported by dmcow-img");
    return fail("Parameter 'qom-type' does not accept value '" + *type + "'");
  }
  if (args.help) {
    PrintTypeHelp(*type);
    return 0;
  }
  const std::string* id = args.Get("id");
  if (id == nullptr) return fail("Parameter 'id' is missing");
  if (const std::string* format = args.Get("format"); format != nullptr && *format != "raw" && *format != "base64") {
    return fail("Parameter 'format' does not accept value '" + *format + "'");
  }
  for (const auto& [key, v] : args.props) {
    const std::string name = key.substr(0, key.find('.'));
    bool known = name == "qom-type" || name == "id" || name == "loaded";
    for (const char* p : kSecretProperties) known = known || name == p;
    if (!known) return fail("Parameter '" + name + "' is unexpected");
    if (name != key) return fail("Invalid parameter type for '" + name + "', expected: string");
  }
  if (args.Get("loaded") != nullptr) return fail("Property 'secret.loaded' is not writable");
  if (!IsIdentifier(*id)) {
    PrintError("Parameter 'id' expects an identifier");
    std::fprintf(stderr, "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n");
    return 1;
  }
  if (FindSecret(*id) != nullptr) {
    return fail("attempt to add duplicate property '" + *id + "' to object (type 'container')");
  }
  if (!CreateSecret(args, *id, &error)) return fail(error);
  return std::nullopt;
}

}  // namespace dmcow::cli
