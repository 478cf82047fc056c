/*
 * status.c - status strings and the per-thread error message.
 */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char kd_errmsg[KD_ERRMSG_MAX];

#define KD_STATUS_TEXT_(name, text) text,
static const char *const kd_status_text[] = {KD_STATUS_LIST(KD_STATUS_TEXT_)};
#undef KD_STATUS_TEXT_

const char *kd_status_str(kd_status st)
{
    if ((int)st < 0 || st >= KD_STATUS_COUNT_)
        return "unknown status";
    return kd_status_text[st];
}

const char *kd_last_error(void) { return kd_errmsg; }

void kd_clear_error(void) { kd_errmsg[0] = '\0'; }

kd_status kd_fail_at(kd_status st, const char *file, int line, const char *fmt, ...)
{
    char body[KD_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    /* a message longer than the buffer is cut, never overflowed */
    size_t len = strlen(body);
    if (len > KD_ERRMSG_MAX - 64)
        len = KD_ERRMSG_MAX - 64;
    memcpy(kd_errmsg, body, len);
    snprintf(kd_errmsg + len, KD_ERRMSG_MAX - len, " (%.40s:%d)", base, line);
    return st;
}

kd_status kd_fail_restore(kd_status st, const char *msg)
{
    snprintf(kd_errmsg, sizeof kd_errmsg, "%s", msg);
    return st;
}

kd_status kd_fail_context(kd_status st, const char *fmt, ...)
{
    char prefix[KD_ERRMSG_MAX];
    char old[KD_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, kd_errmsg, sizeof old);
    size_t plen = strnlen(prefix, KD_ERRMSG_MAX - 1);
    size_t olen = strnlen(old, KD_ERRMSG_MAX - 1 - plen);
    memcpy(kd_errmsg, prefix, plen);
    memcpy(kd_errmsg + plen, old, olen);
    kd_errmsg[plen + olen] = '\0';
    return st;
}
