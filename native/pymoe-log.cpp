// Log routing: llama.cpp and ggml log through one callback. Lines at or above
// the chosen level go to stderr; error lines are always kept so that a failed
// call can put llama.cpp's own reason into the exception it throws.
#include "pymoe.h"

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#include <cstdio>
#include <deque>
#include <mutex>

#ifndef PYMOE_LLAMA_COMMIT
#define PYMOE_LLAMA_COMMIT "unknown"
#endif
#ifndef PYMOE_CPU_AMX
#define PYMOE_CPU_AMX 0
#endif

namespace pymoe {

namespace {

struct log_state {
    std::mutex              mutex;
    int                     min_level = GGML_LOG_LEVEL_NONE + 100;  // quiet by default
    int                     last_level = GGML_LOG_LEVEL_INFO;       // for GGML_LOG_LEVEL_CONT lines
    std::deque<std::string> errors;
    std::string             partial;  // an error line still being continued
};

log_state & state() {
    static log_state s;
    return s;
}

constexpr size_t max_error_lines = 16;

void log_callback(ggml_log_level level, const char * text, void * /*user_data*/) {
    log_state &                 s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    int lvl = level == GGML_LOG_LEVEL_CONT ? s.last_level : (int) level;
    s.last_level = lvl;
    if (lvl >= s.min_level) {
        fputs(text, stderr);
        fflush(stderr);
    }
    if (lvl == GGML_LOG_LEVEL_ERROR) {
        s.partial += text;
        size_t nl;
        while ((nl = s.partial.find('\n')) != std::string::npos) {
            std::string line = s.partial.substr(0, nl);
            s.partial.erase(0, nl + 1);
            if (line.empty()) {
                continue;
            }
            s.errors.push_back(line);
            if (s.errors.size() > max_error_lines) {
                s.errors.pop_front();
            }
        }
    }
}

struct log_installer {
    log_installer() {
        llama_log_set(log_callback, nullptr);
    }
};

}  // namespace

void log_set_level(int min_level) {
    static log_installer installer;  // install once, before the first use
    std::lock_guard<std::mutex> lock(state().mutex);
    state().min_level = min_level;
}

int log_get_level() {
    std::lock_guard<std::mutex> lock(state().mutex);
    return state().min_level;
}

std::string log_take_errors() {
    log_state &                 s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    std::string                 out;
    for (const auto & line : s.errors) {
        if (!out.empty()) {
            out += "\n";
        }
        out += line;
    }
    if (!s.partial.empty()) {
        out += (out.empty() ? "" : "\n") + s.partial;
    }
    s.errors.clear();
    s.partial.clear();
    return out;
}

void log_clear_errors() {
    log_take_errors();
}

std::string llama_commit() {
    return PYMOE_LLAMA_COMMIT;
}

std::string system_info() {
    std::string out = llama_print_system_info();
    out += "| CPU extra buffer types = ";
    const std::vector<std::string> bufts = cpu_extra_buffer_types();
    for (size_t i = 0; i < bufts.size(); ++i) {
        out += (i ? "," : "") + bufts[i];
    }
    out += bufts.empty() ? "none |" : " |";
    return out;
}

std::vector<std::string> cpu_extra_buffer_types() {
    std::vector<std::string> out;
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (dev == nullptr) {
        return out;
    }
    // the registry's way to reach a backend's extras (what llama.cpp's loader uses)
    auto get = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    if (get == nullptr) {
        return out;
    }
    for (ggml_backend_buffer_type_t * b = get(dev); b != nullptr && *b != nullptr; ++b) {
        out.emplace_back(ggml_backend_buft_name(*b));
    }
    return out;
}

bool build_cpu_amx() {
    return PYMOE_CPU_AMX != 0;
}

}  // namespace pymoe
