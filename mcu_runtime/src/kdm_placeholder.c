int kdm_placeholder_;
