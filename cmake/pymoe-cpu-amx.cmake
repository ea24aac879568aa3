# ggml's AMX weight repacking, off unless PYMOE_CPU_AMX=ON.
#
# Why: with the pinned llama.cpp, a CPU with AMX (Sapphire Rapids and later:
# amx_int8 amx_tile in /proc/cpuinfo) puts Q4/Q8 weights into ggml's "AMX"
# buffer type, and the first decode segfaults in ggml_backend_amx_mul_mat
# (llama.cpp issue #20824, closed without a fix). ggml compiles that code
# whenever the compiler targets AMX: with GGML_NATIVE (-march=native) on such a
# machine, or with GGML_AMX_*. The guard in ggml is `__AMX_INT8__ &&
# __AVX512VNNI__` (ggml-cpu/amx/amx.cpp, ggml-cpu.cpp): turning the compiler's
# AMX targets off with -mno-amx-* leaves -march=native's other extensions
# (AVX-512, VNNI ...) and the other CPU repacking (CPU_REPACK) in place.
# GCC and Clang let an explicit -mno-X win over -march whatever their order.
#
# Used twice, so that both builds agree: included by pymoe's CMakeLists.txt
# before llama.cpp's directory is added, and by tools/build_llama_tools.sh as
# CMAKE_PROJECT_INCLUDE (run after llama.cpp's project() call) for the
# llama-bench baseline. Turn AMX on with -DPYMOE_CPU_AMX=ON
# (pip: -C cmake.define.PYMOE_CPU_AMX=ON; the tools script: PYMOE_CPU_AMX=ON).

option(PYMOE_CPU_AMX "build ggml's AMX weight repacking (crashes with the pinned llama.cpp; see cmake/pymoe-cpu-amx.cmake)" OFF)

if (NOT PYMOE_CPU_AMX AND NOT DEFINED PYMOE_CPU_AMX_FLAGS)
    set(GGML_AMX_TILE OFF CACHE BOOL "ggml: enable AMX-TILE (pymoe: see PYMOE_CPU_AMX)" FORCE)
    set(GGML_AMX_INT8 OFF CACHE BOOL "ggml: enable AMX-INT8 (pymoe: see PYMOE_CPU_AMX)" FORCE)
    set(GGML_AMX_BF16 OFF CACHE BOOL "ggml: enable AMX-BF16 (pymoe: see PYMOE_CPU_AMX)" FORCE)
    set(PYMOE_CPU_AMX_FLAGS "")
    if (NOT MSVC)  # MSVC has no AMX code generation
        include(CheckCXXCompilerFlag)
        # a compiler that does not know a flag cannot target that extension either
        foreach (ext amx-tile amx-int8 amx-bf16)
            string(MAKE_C_IDENTIFIER "PYMOE_CXX_HAS_NO_${ext}" has_flag)
            check_cxx_compiler_flag("-mno-${ext}" ${has_flag})
            if (${has_flag})
                list(APPEND PYMOE_CPU_AMX_FLAGS "-mno-${ext}")
            endif()
        endforeach()
    endif()
    # directory-wide: every target added after this point, ggml-cpu included
    add_compile_options(${PYMOE_CPU_AMX_FLAGS})
    message(STATUS "pymoe: AMX weight repacking off (PYMOE_CPU_AMX=OFF): ${PYMOE_CPU_AMX_FLAGS}")
elseif (PYMOE_CPU_AMX)
    message(STATUS "pymoe: AMX weight repacking allowed (PYMOE_CPU_AMX=ON)")
endif()
