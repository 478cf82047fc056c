/*
 * export_internal.h - the report record shared by export.c (which fills it) and report.c (which
 * prints it and writes it as JSON). Not part of the exporter's API (export.h).
 */
#ifndef KD_EXPORT_INTERNAL_H
#define KD_EXPORT_INTERNAL_H

#include "export.h"

#define KD_EXPORT_MAX_FILES 6

struct kd_export_report {
    kd_export_graph *g; /* owned */
    char config[512], checkpoint[512], model[640];
    int bits, qat, softmax, bias_corrected;
    int qat_bits; /* the job's QAT width (its weights are the float model), else 0 */
    uint32_t flags, op_mask;
    size_t blob_len;
    uint32_t *op_bytes;  /* constant bytes of each op (weights, bias, quant record, params) */
    uint32_t *op_wbytes; /* of which its packed weights (rows with their padding) */
    int64_t params, macs, calib_n;
    /* test-set evaluation (evaluated = 0 when skipped) */
    int evaluated;
    int64_t test_n;
    double acc_engine, acc_float, acc_int;
    double agree_float_engine; /* folded vs unfolded argmax */
    double agree_int_float;    /* integer vs folded float argmax */
    double max_fold_err;       /* largest |folded - unfolded| logit ... */
    int fold_n;                /* ... over the first fold_n test images */
    double mean_int_err;       /* mean |dequantized int - float| logit */
    double logit_range;        /* mean max |float logit|, to read mean_int_err against */
    int64_t n_samples;
    char files[KD_EXPORT_MAX_FILES][1024];
    int nfiles;
    /* outputs of an earlier export in out_dir that this one does not write: removed once the
     * new files are in place */
    char removed[KD_EXPORT_MAX_FILES][1024];
    int nremoved;
    double seconds;
};

/* The report as JSON text ending in a newline (the caller frees *text). */
kd_status kd_export_report_json(const kd_export_report *r, char **text, size_t *len);

#endif
