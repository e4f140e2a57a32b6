from demo import views
from django.urls import path

urlpatterns = [
    path("add/", views.dispatch_add, name="add"),
    path("tasks/<str:task_id>/", views.task_state, name="task-state"),
    path("async/tasks/<str:task_id>/", views.task_state_async, name="task-state-async"),
]
