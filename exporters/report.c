/*
 * report.c - the export report: a table for the terminal and the same facts as JSON.
 *
 * Per op: engine block(s), runtime type, shapes (C x H x W), MACs, constant bytes (packed
 * weights with row padding, bias, multipliers and shifts, parameters), arena bytes of its output
 * and how that output's range was chosen. Totals, the arena plan, the input quantization and
 * the test-set accuracies (engine, folded float, integer) follow.
 */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "export_internal.h"

static const char *act_name(int act)
{
    return act == KD_EXPORT_ACT_RELU ? "relu" : act == KD_EXPORT_ACT_RELU6 ? "relu6" : "";
}

static void shape_str(const kd_export_tensor *t, char *buf, size_t len)
{
    snprintf(buf, len, "%dx%dx%d", t->c, t->h, t->w);
}

void kd_export_report_print(const kd_export_report *r, FILE *f)
{
    const kd_export_graph *g = r->g;
    fprintf(f, "export %s (%s) from %s\n", r->model, r->config, r->checkpoint);
    fprintf(f,
            "  weights int%d per output channel (%s)%s, activations int8 per tensor, rounding "
            "%s%s\n",
            r->bits,
            r->qat         ? "max-abs scales, as trained with QAT"
            : r->bits == 4 ? "clipping search"
                           : "max-abs",
            r->bias_corrected ? ", bias correction" : "",
            r->flags & KDM_FLAG_SINGLE_ROUNDING ? "single" : "double (TFLite)",
            r->softmax ? ", softmax output" : "");
    if (r->qat_bits && !r->qat)
        fprintf(f,
                "  the float model is the job's int%d QAT weights (as distill eval runs it), "
                "quantized again to int%d\n",
                r->qat_bits, r->bits);
    fprintf(f, "  %3s %-16s %-22s %-10s %-10s %2s %9s %8s %8s %7s %-5s %s\n", "op", "blocks",
            "type", "in", "out", "wb", "MACs", "weight B", "const B", "arena B", "act",
            "range (calibration)");
    for (int i = 0; i < g->nop; i++) {
        const kd_export_op *o = &g->op[i];
        const kd_export_tensor *ti = &g->t[o->in0], *to = &g->t[o->out];
        char blocks[160], type[40], in[32], out[32];
        snprintf(blocks, sizeof blocks, "%s%s%s", o->name, o->fused[0] ? "+" : "", o->fused);
        for (char *c = blocks; *c; c++)
            *c = *c == ',' ? '+' : *c;
        if (o->kernel)
            snprintf(type, sizeof type, "%s %dx%d/%d", kd_export_op_type_name(o->type), o->kernel,
                     o->kernel, o->stride);
        else
            snprintf(type, sizeof type, "%s", kd_export_op_type_name(o->type));
        shape_str(ti, in, sizeof in);
        shape_str(to, out, sizeof out);
        char wb[8] = "";
        if (o->wbits)
            snprintf(wb, sizeof wb, "%d", o->wbits);
        fprintf(f, "  %3d %-16s %-22s %-10s %-10s %2s %9lld %8u %8u %7u %-5s [%.4g, %.4g] %s\n", i,
                blocks, type, in, out, wb, (long long)o->macs, r->op_wbytes[i], r->op_bytes[i],
                to->bytes, act_name(o->act), to->rmin, to->rmax, to->choice);
    }
    const kd_export_tensor *ti = &g->t[g->input];
    fprintf(f,
            "  input %dx%dx%d: scale %.6g zero-point %d (%s, range [%.4g, %.4g]); %lld "
            "calibration samples\n",
            ti->c, ti->h, ti->w, ti->scale, ti->zero_point, ti->choice, ti->rmin, ti->rmax,
            (long long)r->calib_n);
    fprintf(f, "  total: %lld parameters, %lld MACs, blob %zu bytes, arena %u bytes\n",
            (long long)r->params, (long long)r->macs, r->blob_len, g->arena_size);
    fprintf(f, "  arena: tensors %u bytes (%s; lower bound %u) + scratch %u bytes; op mask 0x%X\n",
            g->tensors_end, g->plan_method, g->arena_bound, g->scratch_size, r->op_mask);
    if (r->evaluated) {
        fprintf(f, "  test accuracy (%lld samples):\n", (long long)r->test_n);
        fprintf(f, "    engine (unfolded float)  %6.2f%%\n", 100 * r->acc_engine);
        fprintf(f,
                "    folded float             %6.2f%%  (same prediction as the engine on %.2f%%, "
                "largest logit difference %.2g on the first %d images)\n",
                100 * r->acc_float, 100 * r->agree_float_engine, r->max_fold_err, r->fold_n);
        fprintf(f,
                "    integer (int%d, runtime)  %6.2f%%  (same prediction as folded float on "
                "%.2f%%, mean |output error| %.3g vs mean max |output| %.3g)\n",
                r->bits, 100 * r->acc_int, 100 * r->agree_int_float, r->mean_int_err,
                r->logit_range);
    }
    for (int i = 0; i < r->nfiles; i++)
        fprintf(f, "  wrote %s\n", r->files[i]);
    if (r->nremoved) {
        fprintf(f, "  removed stale");
        for (int i = 0; i < r->nremoved; i++)
            fprintf(f, "%s %s", i ? "," : "", r->removed[i]);
        fprintf(f, " (left by an earlier export, not written by this one)\n");
    }
}

static cJSON *shape_json(const kd_export_tensor *t)
{
    int s[3] = {t->c, t->h, t->w};
    return cJSON_CreateIntArray(s, 3);
}

static cJSON *quant_json(const kd_export_tensor *t)
{
    cJSON *q = cJSON_CreateObject();
    cJSON_AddItemToObject(q, "shape", shape_json(t));
    cJSON_AddNumberToObject(q, "scale", t->scale);
    cJSON_AddNumberToObject(q, "zero_point", t->zero_point);
    cJSON_AddNumberToObject(q, "min", t->rmin);
    cJSON_AddNumberToObject(q, "max", t->rmax);
    cJSON_AddNumberToObject(q, "seen_min", t->seen_min);
    cJSON_AddNumberToObject(q, "seen_max", t->seen_max);
    cJSON_AddStringToObject(q, "calibration", t->choice);
    cJSON_AddNumberToObject(q, "arena_offset", t->arena_off);
    return q;
}

static cJSON *report_json(const kd_export_report *r)
{
    const kd_export_graph *g = r->g;
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "config", r->config);
    cJSON_AddStringToObject(root, "checkpoint", r->checkpoint);
    cJSON_AddStringToObject(root, "model", r->model);
    cJSON_AddStringToObject(root, "weights", r->bits == 4 ? "int4" : "int8");
    cJSON_AddBoolToObject(root, "qat", r->qat);
    cJSON_AddNumberToObject(root, "qat_bits", r->qat_bits);
    cJSON_AddBoolToObject(root, "bias_correction", r->bias_corrected);
    cJSON_AddStringToObject(root, "rounding",
                            r->flags & KDM_FLAG_SINGLE_ROUNDING ? "single" : "double");
    cJSON_AddBoolToObject(root, "softmax", r->softmax);
    cJSON_AddNumberToObject(root, "calibration_samples", (double)r->calib_n);
    cJSON_AddItemToObject(root, "input", quant_json(&g->t[g->input]));
    cJSON_AddItemToObject(root, "output", quant_json(&g->t[g->output]));
    cJSON *ops = cJSON_AddArrayToObject(root, "ops");
    for (int i = 0; i < g->nop; i++) {
        const kd_export_op *o = &g->op[i];
        const kd_export_tensor *to = &g->t[o->out];
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "name", o->name);
        cJSON *fused = cJSON_AddArrayToObject(j, "fused");
        char buf[sizeof o->fused];
        snprintf(buf, sizeof buf, "%s", o->fused);
        for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ","))
            cJSON_AddItemToArray(fused, cJSON_CreateString(tok));
        cJSON_AddStringToObject(j, "type", kd_export_op_type_name(o->type));
        cJSON_AddItemToObject(j, "in", shape_json(&g->t[o->in0]));
        if (o->in1 >= 0)
            cJSON_AddItemToObject(j, "in2", shape_json(&g->t[o->in1]));
        cJSON_AddItemToObject(j, "out", shape_json(to));
        if (o->kernel) {
            cJSON_AddNumberToObject(j, "kernel", o->kernel);
            cJSON_AddNumberToObject(j, "stride", o->stride);
            cJSON_AddNumberToObject(j, "pad", o->pad);
        }
        cJSON_AddStringToObject(j, "act", o->act ? act_name(o->act) : "none");
        cJSON_AddNumberToObject(j, "macs", (double)o->macs);
        /* the packed weights (rows with their padding), and every constant byte of the op */
        cJSON_AddNumberToObject(j, "weight_bytes", r->op_wbytes[i]);
        cJSON_AddNumberToObject(j, "const_bytes", r->op_bytes[i]);
        if (o->wbits) {
            cJSON_AddNumberToObject(j, "weight_bits", o->wbits);
            cJSON_AddStringToObject(j, "weight_scales", o->wchoice);
        }
        cJSON_AddNumberToObject(j, "arena_bytes", to->bytes);
        cJSON_AddNumberToObject(j, "arena_offset", to->arena_off);
        cJSON_AddStringToObject(j, "calibration", to->choice);
        cJSON *range = cJSON_AddArrayToObject(j, "range");
        cJSON_AddItemToArray(range, cJSON_CreateNumber(to->rmin));
        cJSON_AddItemToArray(range, cJSON_CreateNumber(to->rmax));
        cJSON_AddNumberToObject(j, "scale", to->scale);
        cJSON_AddNumberToObject(j, "zero_point", to->zero_point);
        cJSON_AddItemToArray(ops, j);
    }
    cJSON *tot = cJSON_AddObjectToObject(root, "totals");
    cJSON_AddNumberToObject(tot, "params", (double)r->params);
    cJSON_AddNumberToObject(tot, "macs", (double)r->macs);
    cJSON_AddNumberToObject(tot, "blob_bytes", (double)r->blob_len);
    cJSON_AddNumberToObject(tot, "arena_bytes", g->arena_size);
    cJSON_AddNumberToObject(tot, "tensor_bytes", g->tensors_end);
    cJSON_AddNumberToObject(tot, "scratch_bytes", g->scratch_size);
    cJSON_AddNumberToObject(tot, "arena_lower_bound", g->arena_bound);
    cJSON_AddStringToObject(tot, "arena_plan", g->plan_method);
    cJSON_AddNumberToObject(tot, "op_mask", r->op_mask);
    if (r->evaluated) {
        cJSON *a = cJSON_AddObjectToObject(root, "accuracy");
        cJSON_AddNumberToObject(a, "test_samples", (double)r->test_n);
        cJSON_AddNumberToObject(a, "engine", r->acc_engine);
        cJSON_AddNumberToObject(a, "float", r->acc_float);
        cJSON_AddNumberToObject(a, "int", r->acc_int);
        cJSON_AddNumberToObject(a, "float_engine_agreement", r->agree_float_engine);
        cJSON_AddNumberToObject(a, "int_float_agreement", r->agree_int_float);
        cJSON_AddNumberToObject(a, "max_fold_logit_error", r->max_fold_err);
        cJSON_AddNumberToObject(a, "fold_error_images", r->fold_n);
        cJSON_AddNumberToObject(a, "mean_abs_logit_error", r->mean_int_err);
        cJSON_AddNumberToObject(a, "mean_max_abs_logit", r->logit_range);
    } else {
        cJSON_AddNullToObject(root, "accuracy");
    }
    cJSON_AddNumberToObject(root, "samples", (double)r->n_samples);
    cJSON *files = cJSON_AddArrayToObject(root, "files");
    for (int i = 0; i < r->nfiles; i++)
        cJSON_AddItemToArray(files, cJSON_CreateString(r->files[i]));
    cJSON *removed = cJSON_AddArrayToObject(root, "removed");
    for (int i = 0; i < r->nremoved; i++)
        cJSON_AddItemToArray(removed, cJSON_CreateString(r->removed[i]));
    cJSON_AddNumberToObject(root, "seconds", r->seconds);
    return root;
}

kd_status kd_export_report_json(const kd_export_report *r, char **text, size_t *len)
{
    *text = NULL;
    *len = 0;
    cJSON *j = report_json(r);
    char *t = j ? cJSON_Print(j) : NULL;
    cJSON_Delete(j);
    if (!t)
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory writing the report");
    size_t n = strlen(t);
    char *buf = malloc(n + 2);
    if (!buf) {
        free(t);
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory writing the report");
    }
    memcpy(buf, t, n);
    buf[n] = '\n';
    buf[n + 1] = '\0';
    free(t);
    *text = buf;
    *len = n + 1;
    return KD_OK;
}
