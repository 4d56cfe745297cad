"""dyngate gateway: the Triton server launcher, the Triton client wrapper, routing and the Gradio app."""
