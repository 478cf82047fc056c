/*
 * status.h - the one status vocabulary of the distill engine.
 *
 * Every library function that can fail returns a kd_status. On failure it has
 * recorded a message ("what failed: why (file:line)") that kd_last_error()
 * returns until the next failure on the same thread. Only the CLI turns a
 * status into an exit code; library code never exits.
 */
#ifndef KD_STATUS_H
#define KD_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

/* X(name, text): the text is what kd_status_str() returns. */
#define KD_STATUS_LIST(X)                                                                          \
    X(KD_OK, "ok")                                                                                 \
    X(KD_ERR_INVALID, "invalid argument")                                                          \
    X(KD_ERR_IO, "i/o error")                                                                      \
    X(KD_ERR_FORMAT, "malformed file")                                                             \
    X(KD_ERR_CONFIG, "config error")                                                               \
    X(KD_ERR_SHAPE, "shape mismatch")                                                              \
    X(KD_ERR_NOMEM, "out of memory")                                                               \
    X(KD_ERR_NOT_FOUND, "not found")                                                               \
    X(KD_ERR_UNSUPPORTED, "unsupported")                                                           \
    X(KD_ERR_DEVICE, "device error")                                                               \
    X(KD_ERR_INTERRUPTED, "interrupted")                                                           \
    X(KD_ERR_INTERNAL, "internal error")

#define KD_STATUS_ENUM_(name, text) name,
typedef enum { KD_STATUS_LIST(KD_STATUS_ENUM_) KD_STATUS_COUNT_ } kd_status;
#undef KD_STATUS_ENUM_

/* Short fixed text for a status code ("config error"). */
const char *kd_status_str(kd_status st);

/* The longest message kept (bytes, with its terminating NUL): a buffer that saves one. */
#define KD_ERRMSG_MAX 2048

/* The message recorded by the last failure on this thread ("" if none). */
const char *kd_last_error(void);

/* Forget the recorded message (tests use it between cases). */
void kd_clear_error(void);

/*
 * Record a formatted message for status st and return st. The message
 * replaces the previous one. Use through KD_FAIL so file:line are filled in.
 */
kd_status kd_fail_at(kd_status st, const char *file, int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/*
 * Prefix the recorded message with context ("loading runs/x.safetensors: ")
 * and return st unchanged; used when a failure passes up through a layer that
 * knows more about what was being done.
 */
kd_status kd_fail_context(kd_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/*
 * Record msg, a message saved earlier from kd_last_error(), as it is, and return st: a failure
 * that stays the one reported after later calls that may fail in turn (a teardown).
 */
kd_status kd_fail_restore(kd_status st, const char *msg);

#define KD_FAIL(st, ...) kd_fail_at((st), __FILE__, __LINE__, __VA_ARGS__)

/* Evaluate a kd_status expression and return it from the caller on failure. */
#define KD_TRY(expr)                                                                               \
    do {                                                                                           \
        kd_status kd_try_st_ = (expr);                                                             \
        if (kd_try_st_ != KD_OK)                                                                   \
            return kd_try_st_;                                                                     \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
