// Devices: the backends this build has, and ggml's RPC backend: devices on
// other machines (or on this one, over loopback) used like GPUs, and the
// server that offers this build's own patched CPU backend as such a device (a
// stock rpc-server would index the engine's negative expert ids out of bounds).
#include "pymoe.h"

#include "ggml-backend.h"
#include "ggml-rpc.h"
#include "ggml.h"

#include <cerrno>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#ifdef _WIN32
#    include <winsock2.h>
#    include <ws2tcpip.h>
#else
#    include <netdb.h>
#    include <sys/socket.h>
#    include <unistd.h>
#endif

namespace pymoe {

namespace {

void split_endpoint(const std::string & endpoint, std::string & host, std::string & port) {
    const size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size()) {
        throw std::invalid_argument("'" + endpoint + "' is not an RPC endpoint; hint: write HOST:PORT, e.g. 127.0.0.1:50052");
    }
    host = endpoint.substr(0, colon);
    port = endpoint.substr(colon + 1);
    for (char c : port) {
        if (c < '0' || c > '9') {
            throw std::invalid_argument("'" + endpoint + "': the port must be a number; hint: write HOST:PORT");
        }
    }
}

// ggml's RPC client aborts the process when it cannot connect: try first, and
// say what is wrong in a way the user can act on
void check_reachable(const std::string & endpoint) {
    std::string host, port;
    split_endpoint(endpoint, host, port);
    addrinfo   hints = {};
    hints.ai_family   = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * res    = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
        throw std::runtime_error("cannot resolve the RPC server '" + endpoint + "'; hint: check the host name");
    }
    bool ok = false;
    int  err = 0;
    for (addrinfo * a = res; a && !ok; a = a->ai_next) {
        const auto fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        ok  = connect(fd, a->ai_addr, (socklen_t) a->ai_addrlen) == 0;
        err = ok ? 0 : errno;
#ifdef _WIN32
        closesocket(fd);
#else
        close(fd);
#endif
    }
    freeaddrinfo(res);
    if (!ok) {
        throw std::runtime_error("cannot connect to the RPC server at " + endpoint + " (" + std::strerror(err) +
                                 "); hint: start one there with `pymoe rpc-server --host HOST --port PORT`");
    }
}

// A lost server makes ggml's RPC client abort the process (its calls have no
// error path): say which server and what to do before it does.
std::mutex                         g_endpoints_mutex;
std::map<std::string, std::string> g_endpoints;  // device name -> endpoint

void rpc_abort_message(const char * message) {
    std::string servers;
    {
        std::lock_guard<std::mutex> lock(g_endpoints_mutex);
        for (const auto & [dev, ep] : g_endpoints) {
            servers += (servers.empty() ? "" : ", ") + ep;
        }
    }
    std::fprintf(stderr, "pymoe: %s\n", message);
    if (std::strstr(message, "RPC")) {
        std::fprintf(stderr,
                     "pymoe: lost the connection to the RPC server (%s); the process stops here because ggml's RPC "
                     "client cannot recover.\nhint: restart `pymoe rpc-server` and load the model again\n",
                     servers.c_str());
    }
    std::fflush(stderr);
}

}  // namespace

std::vector<device_info> list_devices() {
    std::vector<device_info> out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        device_info        d;
        d.name        = ggml_backend_dev_name(dev);
        d.description = ggml_backend_dev_description(dev);
        switch (ggml_backend_dev_type(dev)) {
            case GGML_BACKEND_DEVICE_TYPE_CPU:   d.type = "cpu"; break;
            case GGML_BACKEND_DEVICE_TYPE_GPU:   d.type = "gpu"; break;
            case GGML_BACKEND_DEVICE_TYPE_IGPU:  d.type = "igpu"; break;
            default:                             d.type = "accel"; break;
        }
        size_t free = 0, total = 0;
        ggml_backend_dev_memory(dev, &free, &total);
        d.free        = free;
        d.total       = total;
        d.host_buffer = ggml_backend_dev_host_buffer_type(dev) != nullptr;
        {
            std::lock_guard<std::mutex> lock(g_endpoints_mutex);
            auto it = g_endpoints.find(d.name);
            d.endpoint = it == g_endpoints.end() ? "" : it->second;
        }
        out.push_back(d);
    }
    return out;
}

std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string> & endpoints) {
    std::vector<ggml_backend_dev_t> out;
    for (const auto & ep : endpoints) {
        check_reachable(ep);
        ggml_backend_reg_t reg = ggml_backend_rpc_add_server(ep.c_str());  // once per endpoint and process
        if (!reg) {
            throw std::runtime_error("the RPC server at " + ep + " offers no device; hint: check the server's log");
        }
        bool registered = false;
        for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
            registered |= ggml_backend_reg_get(i) == reg;
        }
        if (!registered) {
            ggml_backend_register(reg);
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) {
            ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, i);
            out.push_back(dev);
            std::lock_guard<std::mutex> lock(g_endpoints_mutex);
            g_endpoints[ggml_backend_dev_name(dev)] = ep;
        }
    }
    if (!out.empty()) {
        ggml_set_abort_callback(rpc_abort_message);
    }
    return out;
}

bool has_local_gpu() {
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const auto         t   = ggml_backend_dev_type(dev);
        if ((t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) && !is_rpc_device(dev)) {
            return true;
        }
    }
    return false;
}

bool is_rpc_device(ggml_backend_dev_t dev) {
    std::lock_guard<std::mutex> lock(g_endpoints_mutex);
    return g_endpoints.count(ggml_backend_dev_name(dev)) > 0;
}

void rpc_serve(const std::string & host, int32_t port, int32_t n_threads) {
    if (port <= 0 || port > 65535) {
        throw std::invalid_argument("RPC server port " + std::to_string(port) + " is out of range; hint: use 1-65535");
    }
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu) {
        throw std::runtime_error("this build has no CPU backend to serve");
    }
    const std::string endpoint = host + ":" + std::to_string(port);
    // blocks while it serves, one client at a time; returns when it cannot listen
    const int32_t threads = n_threads > 0 ? n_threads : (int32_t) std::max(1u, std::thread::hardware_concurrency());
    ggml_backend_rpc_start_server(endpoint.c_str(), nullptr, (size_t) threads, 1, &cpu);
    throw std::runtime_error("the RPC server could not listen on " + endpoint +
                             "; hint: the port may be in use, or the address not this machine's");
}

}  // namespace pymoe
