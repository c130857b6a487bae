# Reference solution for notebooks/08_image_to_image.ipynb: the timesteps img2img runs
def my_timesteps(num_inference_steps, strength):
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # noqa: F821 (the notebook's pipe)
    scheduler.set_timesteps(num_inference_steps)
    keep = int(num_inference_steps * strength)  # diffusers rounds down
    # the last `keep` steps; not timesteps[-keep:], which is the whole schedule when keep == 0
    return scheduler.timesteps[num_inference_steps - keep:].tolist()
