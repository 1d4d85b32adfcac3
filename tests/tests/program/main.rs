//! The XDP program on crafted packets through BPF_PROG_TEST_RUN, one module
//! per feature; shared set-up in `lb_tests::routed` and `lb_tests::packet`.
mod concurrency;
mod counts;
mod datapath;
mod dsr;
mod failover;
mod fullnat;
mod hostile;
mod icmp;
mod port_reuse;
mod random_two;
mod reply_entry;
